"""Engines side by side in one process (in-process engine cores): two ExpertWeave engines started alike and
given different adapters, compiled, their generate calls interleaved, each serving its own adapters exactly as
their merged models; and, last, a plain vLLM engine beside one of them (its shutdown ends this process's
distributed state, as in tests/test_vllm.py). Each engine keeps its own weave on its own model runner, and
the compiled graphs, which two such engines share through vLLM's compile cache, hold no engine's state."""

import pytest
import torch

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from expertweave_ascend.errors import AdapterStateError  # noqa: E402
from expertweave_ascend.integrations.hf import load_model  # noqa: E402

PROMPTS = ([5, 17, 42, 99], [3, 250, 7], [8, 8, 31])
TOKENS = 6
ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20, max_adapters=2, adapter_slots=32,
              granularity=64 << 10)
OWN = {"first": ("law", "math"), "second": ("code", "intent")}


@pytest.fixture(autouse=True)
def in_process_engine(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="module")
def engines(tiny_decisive):
    """Two ExpertWeave engines started with the same arguments (so the same compiled graphs), then each given
    its own two adapters."""
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    started = {}
    try:
        for key, names in OWN.items():
            started[key] = ExpertWeaveLLM(str(tiny_decisive / "base"), {}, **ENGINE)
            for name in names:
                started[key].load_adapter(name, tiny_decisive / "adapters" / name)
        yield started
    finally:
        for llm in started.values():
            llm.shutdown()


@pytest.fixture(scope="module")
def references(tiny_decisive):
    """Greedy tokens of each adapter's merged model (None: the base) for each prompt, computed once."""
    base = load_model(tiny_decisive / "base", torch.float32)
    cache = {}

    def tokens(name, prompt):
        key = (name, tuple(prompt))
        if key not in cache:
            cache[key] = merged_tokens(base, None if name is None else tiny_decisive / "adapters" / name,
                                       list(prompt), TOKENS)
        return cache[key]
    return tokens


def generate(llm, names):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(PROMPTS[i % len(PROMPTS)])} for i in range(len(names))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=names, use_tqdm=False)]


def check(llm, names, references) -> None:
    got = generate(llm, names)
    for i, name in enumerate(names):
        assert got[i] == references(name, PROMPTS[i % len(PROMPTS)]), name


def weave(llm):
    from expertweave_ascend.integrations.vllm import worker

    return llm.llm.collective_rpc(worker.weave_of)[0]


def test_each_engine_has_its_own_weave_and_adapters(engines):
    first, second = weave(engines["first"]), weave(engines["second"])
    assert first is not second and first.model_runner is not second.model_runner
    assert set(engines["first"].list_adapters()) == set(OWN["first"])
    assert set(engines["second"].list_adapters()) == set(OWN["second"])
    assert not engines["first"].llm.llm_engine.vllm_config.model_config.enforce_eager


def test_interleaved_calls_serve_each_engines_own_adapters(engines, references):
    """Calls alternate between the engines, each batch mixing the engine's adapters with the base."""
    rounds = [("first", ["law", None, "math"]), ("second", ["code", "intent", None]),
              ("first", ["math", "law", "law"]), ("second", [None, "code", "intent"]),
              ("first", [None, "math"]), ("second", ["intent", "intent", "code"])]
    for key, names in rounds:
        check(engines[key], names, references)
    for key, names in OWN.items():
        served = weave(engines[key]).started
        assert {name for name in served if name is not None} == set(names), key


def test_an_engine_serves_no_adapter_of_the_other(engines):
    for key, other in (("first", "second"), ("second", "first")):
        with pytest.raises(AdapterStateError, match=f"unknown adapter '{OWN[other][0]}'"):
            generate(engines[key], [OWN[other][0]])


def test_loading_and_unloading_in_one_engine_leaves_the_other_as_it_was(engines, tiny_decisive, references):
    first, second = engines["first"], engines["second"]
    first_weave = weave(first).weave

    def held():
        return {name: (a.row, a.sha256, dict(a.slots)) for name, a in first_weave.adapters.items()}

    second.unload_adapter("intent")
    second.load_adapter("law", tiny_decisive / "adapters" / "law")
    try:
        before = held()
        check(second, ["law", "code", None], references)
        check(first, ["law", "math"], references)
        second.unload_adapter("law")
        assert held() == before and set(second.list_adapters()) == {"code"}
        check(first, ["law", None, "math"], references)
    finally:
        if "law" in second.list_adapters():
            second.unload_adapter("law")
        second.load_adapter("intent", tiny_decisive / "adapters" / "intent")
    check(second, ["intent", "code"], references)


def test_a_plain_engine_beside_an_expertweave_engine_keeps_to_itself(engines, tiny_decisive, references):
    """Last in this module: the plain engine's shutdown ends this process's distributed state."""
    from vllm import LLM, SamplingParams

    first = engines["first"]
    active = weave(first)
    before = (dict(active.started), dict(active.generated))
    plain = LLM(model=str(tiny_decisive / "base"), dtype="float32", max_model_len=256,
                kv_cache_memory_bytes=32 << 20)
    try:
        from expertweave_ascend.integrations.vllm import worker

        assert plain.collective_rpc(lambda w: worker.runner_weave(w.model_runner)) == [None]
        params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        outputs = plain.generate([{"prompt_token_ids": list(p)} for p in PROMPTS], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == [references(None, p) for p in PROMPTS]
        assert (dict(active.started), dict(active.generated)) == before
        check(first, ["law", None, "math"], references)
        assert (dict(active.started), dict(active.generated)) != before
    finally:
        plain.llm_engine.engine_core.shutdown()
