"""Adapters that tune non-expert modules in the real vLLM engine, in this process: requests of the base,
routed-only adapters and two non-expert variants submitted together run in steps that never mix variants
(ExpertWeave's scheduler; the worker refuses a mixed step), the weights are switched between steps, and
every output equals its merged model, eager and compiled. An engine without ExpertWeave's scheduler
refuses such adapters in one line.

One engine per mode (eager, compiled) serves this module's tests, each leaving it as it found it save for
what it says it unloads; only the engine on vLLM's own scheduler is a private one."""

import pytest
import torch

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402
from expertweave_ascend.integrations.hf import load_model  # noqa: E402
from test_variants import with_non_expert  # noqa: E402

PROMPTS = ([5, 17, 42, 99], [3, 250, 7], [8, 8, 31])
TOKENS = 6
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20, granularity=64 << 10)
SEATS = 4


@pytest.fixture(scope="module")
def adapters(tiny_decisive, tmp_path_factory):
    out = tmp_path_factory.mktemp("variants")
    return {"law": tiny_decisive / "adapters" / "law",
            "law-ne": with_non_expert(tiny_decisive, "law", out / "law-ne"),
            "ne-only": with_non_expert(tiny_decisive, None, out / "ne-only", seed=1),
            "code": tiny_decisive / "adapters" / "code"}


def engine(base, adapters, **kwargs):
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    kwargs.setdefault("max_adapters", max(1, len(adapters)))
    return ExpertWeaveLLM(str(base), {n: str(p) for n, p in adapters.items()}, **ENGINE, **kwargs)


@pytest.fixture(scope="module", params=[True, False], ids=["eager", "compiled"])
def llm(request, tiny_decisive, adapters):
    """The module's engine in one mode (param: enforce_eager), started with law, law-ne, ne-only and code, room
    for one more adapter, and four seats (max_num_seqs)."""
    llm = engine(tiny_decisive / "base", adapters, enforce_eager=request.param, max_adapters=len(adapters) + 1,
                 adapter_slots=64, max_num_seqs=SEATS)
    yield llm
    llm.shutdown()


# A test on the eager engine only.
EAGER = pytest.mark.parametrize("llm", [True], ids=["eager"], indirect=True)


def generate(llm, names, tokens=TOKENS):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=names, use_tqdm=False)]


def check(llm, base, adapters, names, tokens=TOKENS) -> list[list[int]]:
    """Generates for all names at once; every output equals its merged model's. Returns the outputs."""
    got = generate(llm, names, tokens)
    base_model = load_model(base, torch.float32)
    for i, name in enumerate(names):
        want = merged_tokens(base_model, None if name is None else adapters[name], PROMPTS[i % len(PROMPTS)], tokens)
        assert got[i] == want, name
    return got


def test_variants_submitted_together_equal_their_merged_models(llm, tiny_decisive, adapters):
    from expertweave_ascend.integrations.vllm import worker

    base = tiny_decisive / "base"
    got = check(llm, base, adapters, [None, "law-ne", "law", "ne-only", "code", "law-ne", None, "ne-only", "law"])
    assert got[1] != merged_tokens(load_model(base, torch.float32), adapters["law"], PROMPTS[1], TOKENS), \
        "the tuned non-expert tensors change law-ne's outputs"
    active = llm.llm.collective_rpc(worker.weave_of)[0]
    switcher = active.switcher
    assert switcher.switches >= 2, "law-ne's and ne-only's weights each had steps (the base's are in at start)"
    assert llm.memory_report().adapters["law-ne"].non_expert_bytes == sum(
        t.numel() * 2 for t in active.weave.adapters["law-ne"].non_expert.values())
    llm.unload_adapter("ne-only")
    check(llm, base, adapters, ["law-ne", None, "code", "law-ne"])


@EAGER
def test_a_variant_tuning_one_half_of_a_fused_weight_leaves_the_other_half_the_bases(llm, tiny_decisive, tmp_path):
    """vLLM loads gate_proj and up_proj into one parameter: switching to a variant that tunes only gate_proj,
    and back, keeps up_proj (and so the base's outputs) intact."""
    base = tiny_decisive / "base"
    adapters = {"gate-only": with_non_expert(tiny_decisive, "law", tmp_path / "gate-only",
                                             names=("model.layers.0.mlp.gate_proj.weight",))}
    llm.load_adapter("gate-only", adapters["gate-only"])
    check(llm, base, adapters, [None])
    check(llm, base, adapters, ["gate-only", "gate-only"])
    check(llm, base, adapters, [None, None])
    llm.unload_adapter("gate-only")


@EAGER
def test_a_variant_that_finds_the_seats_taken_gets_them_when_the_others_finish(llm, tiny_decisive, adapters):
    """Every seat (max_num_seqs) taken by base requests longer than a quantum when the variant's turn comes:
    the base requests run on, admitting no one new, and the variant's requests are served after them."""
    check(llm, tiny_decisive / "base", adapters, [None] * SEATS + ["law-ne", None, "law-ne"], tokens=40)


def test_an_engine_without_expertweaves_scheduler_refuses_them(tiny_decisive, adapters):
    llm = engine(tiny_decisive / "base", {}, enforce_eager=True, adapter_slots=32,
                 scheduler_cls="vllm.v1.core.sched.scheduler.Scheduler")
    try:
        with pytest.raises(ExpertWeaveError, match='"non_expert_modules" is true: this engine runs every request '
                                                   "with the base's non-expert weights"):
            llm.load_adapter("law-ne", adapters["law-ne"])
        assert llm.list_adapters() == {}
        llm.load_adapter("law", adapters["law"])
    finally:
        llm.shutdown()
