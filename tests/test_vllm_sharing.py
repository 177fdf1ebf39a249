"""Expert sharing in the real vLLM engine, in this process: adapters holding the same experts cost their
bytes once, every row still equals its merged model, unloading one sharer leaves the others intact, and
with consolidation on the outputs equal the model the report describes."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from expertweave_ascend.adapters import EsftAdapter  # noqa: E402
from expertweave_ascend.integrations.hf import load_model  # noqa: E402
from expertweave_ascend.tiny import make_tiny  # noqa: E402
from test_sharing import base_experts_adapter, changed_version, relative_distances  # noqa: E402

ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20, enforce_eager=True,
              granularity=64 << 10)
PROMPTS = ([5, 17, 42, 99], [3, 250, 7])
TOKENS = 6
EXPERT_BYTES = (2 * 64 * 128 + 128 * 64) * 4


def engine(base, adapters, **kwargs):
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    return ExpertWeaveLLM(str(base), {n: str(p) for n, p in adapters.items()}, max_adapters=len(adapters),
                          adapter_slots=64, **ENGINE, **kwargs)


def greedy(llm, names):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=names, use_tqdm=False)]


def assert_merged(llm, base, adapters, names):
    base_model = load_model(base, torch.float32)
    for i, (name, tokens) in enumerate(zip(names, greedy(llm, names))):
        want = merged_tokens(base_model, None if name is None else adapters[name], PROMPTS[i % len(PROMPTS)], TOKENS)
        assert tokens == want, name


def test_sharers_cost_one_copy_and_survive_each_others_unload(tiny_decisive, tmp_path):
    base, law = tiny_decisive / "base", tiny_decisive / "adapters" / "law"
    v2, _ = changed_version(tiny_decisive, "law", tmp_path / "law-v2", 3)
    adapters = {"law": law, "law-copy": law, "same": base_experts_adapter(tiny_decisive, "math", tmp_path / "same"),
                "law-v2": v2, "code": tiny_decisive / "adapters" / "code"}
    llm = engine(base, adapters)
    try:
        names = [None, "law", "law-copy", "same", "law-v2", "code"]
        assert_merged(llm, base, adapters, names)
        m = llm.memory_report()
        law_bytes, code_bytes = m.adapters["law"].bytes, m.adapters["code"].bytes
        assert m.adapter_slot_bytes == law_bytes + 3 * EXPERT_BYTES + code_bytes
        assert m.adapters["same"].base_experts == m.adapters["same"].experts
        assert m.adapters["law-copy"].shared_slots == m.adapters["law"].experts
        mapped = m.adapter_mapped_bytes
        llm.unload_adapter("law")
        assert llm.memory_report().adapter_mapped_bytes == mapped, "law-copy and law-v2 still hold law's slots"
        assert_merged(llm, base, adapters, [None, "law-copy", "law-v2", "same", "law-copy"])
        llm.unload_adapter("law-copy")
        after = llm.memory_report()
        assert after.adapter_slot_bytes == law_bytes + code_bytes, "law-v2 keeps its own and the shared slots"
        assert_merged(llm, base, adapters, ["law-v2", None, "code"])
    finally:
        llm.shutdown()


def without(adapter, experts: set[str], out):
    """A copy of the adapter without these "layer.expert" experts: the model consolidation serves."""
    shutil.copytree(adapter, out)
    cfg = json.loads((out / "expert_cfg.json").read_text())
    cfg["experts"] = {layer: [e for e in ids if f"{layer}.{e}" not in experts] for layer, ids in cfg["experts"].items()}
    (out / "expert_cfg.json").write_text(json.dumps(cfg))
    tensors = {k: v for k, v in load_file(out / "model.safetensors").items()
               if ".".join(k.split(".")[2:6:3]) not in experts}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    assert EsftAdapter.open(out).num_experts == EsftAdapter.open(adapter).num_experts - len(experts)
    return out


def test_consolidation_serves_the_model_its_report_describes(tmp_path):
    spread = tmp_path / "spread"
    make_tiny(spread, adapters=3, seed=0, decisive=True, delta_spread=(1e-3, 1.0))
    adapters = {name: spread / "adapters" / name for name in ("law", "math", "code")}
    x = 0.05
    llm = engine(spread / "base", adapters, consolidate_rel_l2=x)
    try:
        m = llm.memory_report()
        served = {}
        for name, path in adapters.items():
            want = {k: d for k, d in relative_distances(spread, name).items() if d <= x}
            got = m.adapters[name].consolidated or {}
            assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-6) for k in want)
            served[name] = without(path, set(got), tmp_path / f"{name}-served")
        assert m.saved_bytes == sum(len(a.consolidated or ()) for a in m.adapters.values()) * EXPERT_BYTES > 0
        assert_merged(llm, spread / "base", served, [None, "law", "math", "code"])
    finally:
        llm.shutdown()
