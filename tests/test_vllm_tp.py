"""Rank agreement (I7) in the real vLLM CPU engine with tensor parallelism 2: a load that fails on one
rank is undone on the other and reported once; a load every rank agrees on serves."""

import sys

import pytest

pytest.importorskip("vllm")

from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402

ENGINE = dict(max_model_len=256, kv_cache_memory_bytes=32 << 20, enforce_eager=True, tensor_parallel_size=2)


def fail_allocations_on_rank_1(worker) -> int:
    """Sent to every worker by collective_rpc: on rank 1, every adapter allocation fails from now on."""
    from expertweave_ascend.errors import CapacityError
    from expertweave_ascend.integrations.vllm import worker as expertweave_worker

    if worker.rank == 1:
        def refuse(owner, counts, shared=None):
            raise CapacityError(f"adapter {owner} needs adapter slots (injected on rank 1)")

        expertweave_worker.weave_of(worker).weave.memory.allocate = refuse
    return worker.rank


def allow_allocations(worker) -> None:
    from expertweave_ascend.integrations.vllm import worker as expertweave_worker

    memory = expertweave_worker.weave_of(worker).weave.memory
    memory.__dict__.pop("allocate", None)


@pytest.fixture(scope="module")
def engine(tiny):
    import cloudpickle

    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the injected functions travel by value
    # vLLM binds each CPU worker to a NUMA node of its own unless told which cores to use (here is one
    # node), and sends a function to the workers only when allowed to pickle it; the client reads both too.
    with pytest.MonkeyPatch.context() as environment:
        environment.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
        environment.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        llm = ExpertWeaveLLM(str(tiny / "base"), {}, max_adapters=2, adapter_slots=16, granularity=64 << 10, **ENGINE)
        yield llm
        llm.shutdown()


def test_a_load_that_fails_on_rank_1_is_undone_on_rank_0(engine, tiny):
    before = engine.llm.collective_rpc("expertweave_memory_report")
    assert sorted(engine.llm.collective_rpc(fail_allocations_on_rank_1)) == [0, 1]
    try:
        with pytest.raises(ExpertWeaveError) as excinfo:
            engine.load_adapter("law", tiny / "adapters" / "law")
    finally:
        engine.llm.collective_rpc(allow_allocations)
    message = str(excinfo.value)
    assert "injected on rank 1" in message and "(rank 1 of 2; undone on the others)" in message
    assert "\n" not in message
    assert engine.llm.collective_rpc("expertweave_list_adapters") == [{}, {}]
    assert engine.llm.collective_rpc("expertweave_memory_report") == before
    assert engine.list_adapters() == {}


def test_a_load_every_rank_agrees_on_serves_and_unloads_everywhere(engine, tiny):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    prompt = "the court held that a contract requires"
    base = engine.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    info = engine.load_adapter("law", tiny / "adapters" / "law")
    lists = engine.llm.collective_rpc("expertweave_list_adapters")
    assert [set(ranks) for ranks in lists] == [{"law"}, {"law"}] and info["row"] == 1
    law = engine.generate([prompt], params, adapter="law", use_tqdm=False)[0].outputs[0].token_ids
    assert law != base, "the adapter did not change the output"
    engine.unload_adapter("law", timeout=60)
    assert engine.llm.collective_rpc("expertweave_list_adapters") == [{}, {}]


def test_ranks_that_place_an_adapter_differently_are_undone_everywhere():
    from dataclasses import replace

    from expertweave_ascend.integrations.vllm.agreement import check_load
    from expertweave_ascend.loader import LoadAnswer

    same = LoadAnswer(row=1, experts=2, bytes=10, sha256="ab" * 32, slots={"1": [16, 17]})
    assert check_load("law", [same, replace(same)]).loaded == same
    outcome = check_load("law", [same, replace(same, slots={"1": [16, 18]})])
    assert outcome.roll_back and outcome.loaded is None
    assert outcome.error == "adapter 'law': the ranks placed it differently (rank 0: row 1; rank 1: row 1); undone on every rank"
    outcome = check_load("law", [same, replace(same, sha256="cd" * 32)])
    assert outcome.roll_back and outcome.error == ("adapter 'law': the ranks read different bytes (rank 0: sha256 "
                                                   "abababababab; rank 1: sha256 cdcdcdcdcdcd); was it changed while "
                                                   "loading? Undone on every rank")
    outcome = check_load("law", [LoadAnswer(error="x: bad"), LoadAnswer(error="x: bad")])
    assert outcome.error == "x: bad" and not outcome.roll_back and not outcome.capacity
    outcome = check_load("law", [same, LoadAnswer(error="x: no room", capacity=True)])
    assert outcome.roll_back and outcome.capacity and outcome.error == "x: no room (rank 1 of 2; undone on the others)"
