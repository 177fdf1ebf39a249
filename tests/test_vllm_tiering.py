"""Tiering in the real vLLM engine, in this process: generate serves a catalogue larger than the device
rows in waves (outputs equal the merged models), and an adapter loading on the workers' loader thread
never stops the engine's steps (observed step by step while a load is held in its read phase)."""

import asyncio
import threading
import time

import pytest
import torch

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens, write_variants  # noqa: E402
from expertweave_ascend.errors import AdapterStateError  # noqa: E402
from expertweave_ascend.integrations.hf import load_model  # noqa: E402
from expertweave_ascend.integrations.vllm.workers import Collected, StartAnswer  # noqa: E402

ENGINE = dict(dtype="float32", max_model_len=256, kv_cache_memory_bytes=32 << 20, enforce_eager=True,
              granularity=64 << 10)
PROMPTS = ([5, 17, 42, 99], [3, 250, 7])
TOKENS = 6


@pytest.fixture(scope="module")
def catalogue(tiny_decisive, tmp_path_factory):
    return write_variants(tiny_decisive / "adapters", tmp_path_factory.mktemp("catalogue"), 7)


@pytest.fixture(scope="module")
def engine(tiny_decisive, catalogue):
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    root = next(iter(catalogue.values())).parent
    llm = ExpertWeaveLLM(str(tiny_decisive / "base"), {}, adapter_root=root, max_adapters=2, adapter_slots=64,
                         host_adapter_bytes=16 << 20, **ENGINE)
    yield llm
    llm.shutdown()


def greedy(llm, names):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(names))]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=names, use_tqdm=False)]


def test_generate_serves_more_adapters_than_rows_in_waves_equal_to_merged_models(engine, catalogue, tiny_decisive):
    names = [None, *sorted(catalogue), "a001", None]
    got = greedy(engine, names)
    base_model = load_model(tiny_decisive / "base", torch.float32)
    for i, (name, tokens) in enumerate(zip(names, got)):
        want = merged_tokens(base_model, None if name is None else catalogue[name], PROMPTS[i % len(PROMPTS)], TOKENS)
        assert tokens == want, name
    assert len(engine.list_adapters()) <= 2
    assert set(engine.list_adapters()) <= set(catalogue)


def test_an_adapter_outside_the_catalogue_is_refused_before_anything_runs(engine):
    before = engine.list_adapters()
    with pytest.raises(AdapterStateError, match="unknown adapter 'nope' .*not in the catalogue: a000, a001"):
        greedy(engine, ["a000", "nope"])
    assert engine.list_adapters() == before


def test_steps_complete_while_an_adapter_loads(engine, catalogue):
    """The load is held inside its read (on the loader thread) until the engine has run 20 steps that
    sampled tokens for a base request and for a resident adapter's request; then it is published."""
    from vllm import SamplingParams

    from expertweave_ascend.integrations.vllm import worker

    for name in list(engine.list_adapters()):
        engine.unload_adapter(name)
    engine.load_adapter("a001", catalogue["a001"])  # a resident adapter keeps serving too
    active = engine.llm.collective_rpc(worker.weave_of)[0]
    weave = active.weave
    active.host_tier.drop("a005")  # read from its files, not from the host tier's copy
    release, reading = threading.Event(), threading.Event()
    original = weave.pack

    def held_pack(path):
        reading.set()
        release.wait(60)
        return original(path)

    weave.pack = held_pack
    llm_engine = engine.llm.llm_engine
    try:
        workers = engine.front_end.workers
        assert asyncio.run(workers.start_load("a005", str(catalogue["a005"]), None, [])) == [StartAnswer(started=True)]
        assert reading.wait(30)
        for i in range(4):  # two base requests, two of the resident adapter
            params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
            [prompt], [params] = engine.vllm_requests([{"prompt_token_ids": PROMPTS[i % 2]}], [params],
                                                      ["a001" if i % 2 else None])
            llm_engine.add_request(f"request-{i}", prompt, params)
        sampled_steps = {"request-0": 0, "request-1": 0}
        while min(sampled_steps.values()) < 20:
            for output in llm_engine.step():
                if output.request_id in sampled_steps and output.outputs and output.outputs[0].token_ids:
                    sampled_steps[output.request_id] += 1
            [collected] = asyncio.run(workers.collect())
            assert collected == Collected({}, ["a005"]), "the load finished while it was held"
        release.set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            [collected] = asyncio.run(workers.collect())
            if collected.done:
                break
            llm_engine.step()
            time.sleep(0.01)
        assert set(collected.done) == {"a005"} and collected.done["a005"].source == "disk"
        while llm_engine.has_unfinished_requests():
            llm_engine.step()
    finally:
        release.set()
        weave.pack = original
    asyncio.run(workers.discard("a005"))
    engine.unload_adapter("a001")
