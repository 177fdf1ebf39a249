"""Adapters that tune shared experts in the real vLLM engine, in this process: one batch mixing the base,
routed-only adapters and shared-expert adapters, each row equal to its merged model, eager and compiled
(where vLLM's CPU MoE forward is traced by Dynamo and the per-token selection must stay an opaque op), on
one engine per mode; an engine started without shared experts refuses such adapters and keeps serving
what it holds."""

import pytest
import torch

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from expertweave_ascend.integrations.hf import load_model  # noqa: E402
from test_shared_experts import with_shared_experts  # noqa: E402

PROMPTS = ([5, 17, 42, 99], [3, 250, 7], [8, 8, 31])
TOKENS = 6


@pytest.fixture(scope="module")
def adapters(tiny_decisive, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared")
    return {"law": tiny_decisive / "adapters" / "law",
            "law-shared": with_shared_experts(tiny_decisive, "law", out / "law-shared", (1, 3)),
            "shared-only": with_shared_experts(tiny_decisive, None, out / "shared-only", (1, 2, 3), seed=1),
            "code": tiny_decisive / "adapters" / "code"}


@pytest.fixture(scope="module", params=[True, False], ids=["eager", "compiled"])
def llm(request, tiny_decisive, adapters):
    """The module's engine in one mode (param: enforce_eager), started with its four adapters."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    llm = ExpertWeaveLLM(str(tiny_decisive / "base"), {n: str(p) for n, p in adapters.items()},
                         max_adapters=len(adapters), dtype="float32", max_model_len=256,
                         kv_cache_memory_bytes=32 << 20, enforce_eager=request.param, granularity=64 << 10)
    yield llm
    llm.shutdown()


def check_mixed_batch(llm, base, adapters, names):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    got = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=names, use_tqdm=False)]
    base_model = load_model(base, torch.float32)
    wants = []
    for i, name in enumerate(names):
        wants.append(merged_tokens(base_model, None if name is None else adapters[name], PROMPTS[i % len(PROMPTS)],
                                   TOKENS))
        assert got[i] == wants[-1], name
    return wants


def test_shared_expert_adapters_in_a_mixed_batch_equal_their_merged_models(llm, tiny_decisive, adapters):
    base = tiny_decisive / "base"
    names = [None, "law-shared", "law", "shared-only", "code", "law-shared", None, "shared-only"]
    wants = check_mixed_batch(llm, base, adapters, names)
    assert wants[3] != merged_tokens(load_model(base, torch.float32), None, PROMPTS[0], TOKENS), \
        "the shared-only adapter's tuned shared experts change its outputs"
    report = llm.memory_report()
    assert report.adapters["shared-only"].shared_expert_bytes == 3 * 3 * 128 * 64 * 4
    llm.unload_adapter("law-shared")
    check_mixed_batch(llm, base, adapters, ["shared-only", "law", None])


def test_shared_experts_are_served_when_asked_for_or_named_at_start(tiny_decisive, adapters):
    from expertweave_ascend.geometry import BaseGeometry
    from expertweave_ascend.integrations.vllm.llm import engine_config

    geometry = BaseGeometry.from_checkpoint(tiny_decisive / "base")
    assert not engine_config(geometry, {"law": adapters["law"]}, 2)["shared_experts"]
    assert engine_config(geometry, {"law": adapters["law"]}, 2, shared_experts=True)["shared_experts"]
    assert engine_config(geometry, {"law": adapters["law"], "law-shared": adapters["law-shared"]}, 2)["shared_experts"]


def test_an_engine_started_without_shared_experts_refuses_them_at_load(tiny_decisive, adapters):
    """An engine started with law alone, full (room for one adapter), refuses a shared-expert adapter at load
    and keeps law."""
    import os

    from expertweave_ascend.errors import ExpertWeaveError
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    llm = ExpertWeaveLLM(str(tiny_decisive / "base"), {"law": str(adapters["law"])}, max_adapters=1,
                         dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20, enforce_eager=True,
                         granularity=64 << 10)
    try:
        before = llm.memory_report()
        with pytest.raises(ExpertWeaveError, match=r"started without serving tuned shared experts .*--shared-experts"):
            llm.load_adapter("law-shared", adapters["law-shared"])
        after = llm.memory_report()
        assert set(after.adapters) == {"law"} and after.adapter_expert_bytes == before.adapter_expert_bytes
        check_mixed_batch(llm, tiny_decisive / "base", adapters, [None, "law"])
    finally:
        llm.shutdown()
