"""Contrastive decoding (CoLD) in the real vLLM engine, in this process: every contrastive request runs with
a hidden base-model twin in the same steps (integrations/vllm/pairing.py), and its greedy tokens equal the
transformers reference (two full forwards per token) for several (alpha, beta); in a batch mixing
contrastive, plain adapter and base requests; with prompts longer than the prefill chunk; and when KV
blocks run short and vLLM preempts members of pairs. An aborted request takes its twin with it."""

import os

import pytest
import torch

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from expertweave_ascend.adapters import EsftAdapter  # noqa: E402
from expertweave_ascend.contrastive import Contrastive  # noqa: E402
from expertweave_ascend.integrations.hf import contrastive_tokens, load_model, merge_adapter  # noqa: E402
from test_variants import with_non_expert  # noqa: E402

ENGINE = dict(dtype="float32", granularity=64 << 10, enforce_eager=True)
OPTIONS = ({"alpha": 0.1, "beta": 0.5}, {"alpha": 0.01, "beta": 2.0}, {"alpha": 0.001, "beta": 5.0})


def engine(base, adapters, max_adapters=2, **kwargs):
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    return ExpertWeaveLLM(str(base), {n: str(p) for n, p in adapters.items()}, max_adapters=max_adapters,
                          **ENGINE, **kwargs)


def scheduler(llm):
    return llm.llm.llm_engine.engine_core.engine_core.scheduler


def generate(llm, prompts, names, options, tokens):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, adapter=names, contrastive=options,
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def add_contrastive(llm, request_id: str, prompt: list[int], max_tokens: int) -> None:
    """A contrastive request for law straight into the engine (as the front-ends send it: the adapter's
    arguments and salt), so a test can step the engine itself."""
    from vllm import SamplingParams

    from expertweave_ascend.integrations.vllm.contrastive import CONTRASTIVE_ARGS
    from expertweave_ascend.integrations.vllm.engine import ADAPTER_ARG, adapter_cache_salt

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                            extra_args={ADAPTER_ARG: "law", **dict(zip(CONTRASTIVE_ARGS, (0.1, 0.5)))})
    salt = adapter_cache_salt(llm.list_adapters()["law"]["sha256"], None)
    llm.llm.llm_engine.add_request(request_id, {"prompt_token_ids": prompt, "cache_salt": salt}, params)


class References:
    """The transformers reference of each (prompt, adapter, option): merged models built once."""

    def __init__(self, tiny):
        self.base = load_model(tiny / "base", torch.float32)
        self.paths = {n: tiny / "adapters" / n for n in ("law", "math")}
        self.merged = {n: merge_adapter(self.base, EsftAdapter.open(p)) for n, p in self.paths.items()}

    def tokens(self, prompt, name, option, count):
        if option is None:
            return merged_tokens(self.base, None if name is None else self.paths[name], prompt, count)
        return contrastive_tokens(self.merged[name], self.base, prompt, count, Contrastive(**option))


@pytest.fixture(scope="module")
def references(tiny_decisive):
    return References(tiny_decisive)


@pytest.fixture(scope="module")
def llm(tiny_decisive):
    adapters = {n: tiny_decisive / "adapters" / n for n in ("law", "math")}
    llm = engine(tiny_decisive / "base", adapters, max_adapters=3, max_model_len=256, kv_cache_memory_bytes=32 << 20)
    yield llm
    llm.shutdown()


def test_a_mixed_batch_equals_the_reference_for_each_request(llm, references):
    """Three (alpha, beta) on two adapters beside plain adapter and base requests, all submitted at once."""
    prompts = [[5, 17, 42, 99], [3, 250, 7], [8, 8, 31], [5, 17, 42, 99], [3, 250, 7], [8, 8, 31], [40, 2]]
    names = ["law", "law", "math", "law", None, "math", "law"]
    options = [OPTIONS[0], OPTIONS[1], OPTIONS[2], None, None, None, OPTIONS[2]]
    sched = scheduler(llm)
    reported = []
    update = sched.update_from_output
    sched.update_from_output = lambda *args: reported.append(update(*args)) or reported[-1]
    try:
        got = generate(llm, prompts, names, options, 10)
    finally:
        del sched.update_from_output
    for p, n, o, g in zip(prompts, names, options, got):
        assert g == references.tokens(p, n, o, 10), (n, o)
    ids = {o.request_id for step in reported for outputs in step.values() for o in outputs.outputs}
    assert len(ids) == len(prompts) and not any(i.endswith("~esft-base") for i in ids), "twins never leave the engine"
    assert got[1] != references.tokens(prompts[1], "law", None, 10), "the contrast changes law's tokens here"
    assert not scheduler(llm).requests and not scheduler(llm).pairing.twins


def test_beta_zero_equals_plain_adapter_decoding(llm):
    prompts = [[5, 17, 42, 99], [3, 250, 7], [8, 8, 31]]
    plain = generate(llm, prompts, "law", None, 12)
    assert generate(llm, prompts, "law", {"alpha": 0.1, "beta": 0.0}, 12) == plain


def test_the_twin_is_hidden_from_outputs_and_metrics(llm):
    from expertweave_ascend.integrations.vllm import worker

    generated = llm.llm.collective_rpc(worker.weave_of)[0].generated
    before = dict(generated)
    outputs = llm.generate([{"prompt_token_ids": [5, 17, 42]}], None, adapter="law", contrastive=OPTIONS[0],
                           use_tqdm=False)
    assert len(outputs) == 1 and not outputs[0].request_id.endswith("~esft-base")
    assert generated.get("law", 0) - before.get("law", 0) == len(outputs[0].outputs[0].token_ids)
    assert generated.get(None, 0) == before.get(None, 0), "the twin's samples are not the base's"


def test_aborting_a_contrastive_request_frees_its_twin(llm):
    core, sched = llm.llm.llm_engine, scheduler(llm)
    pool = sched.kv_cache_manager.block_pool
    free = pool.get_num_free_blocks()
    add_contrastive(llm, "abort-me", list(range(3, 60)), 200)
    for _ in range(4):
        core.step()
    assert len(sched.requests) == 2 and len(sched.pairing.twins) == 1
    assert pool.get_num_free_blocks() < free
    core.abort_request(["abort-me"])
    core.step()
    assert not sched.requests and not sched.pairing.twins and not sched.pairing.twin_ids
    assert pool.get_num_free_blocks() == free
    assert not core.has_unfinished_requests()


def test_a_request_whose_twin_ends_first_fails_and_leaves_nothing(llm):
    """Only an engine fault ends a twin alone (it has one token more to go than its request); the request
    then fails rather than run unpaired."""
    from vllm.v1.request import RequestStatus

    core, sched = llm.llm.llm_engine, scheduler(llm)
    free = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    add_contrastive(llm, "orphan", [5, 17, 42], 50)
    for _ in range(3):
        core.step()
    (twin,) = sched.pairing.twin_ids
    sched.finish_requests(twin, RequestStatus.FINISHED_ABORTED)
    outputs = [o for _ in range(2) for o in core.step()]
    assert [(o.finished, o.outputs[0].finish_reason) for o in outputs] == [(True, "error")]
    assert not sched.requests and not sched.pairing.twins and not sched.pairing.twin_ids
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == free


def test_seeded_sampling_repeats_whatever_the_batch(llm):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    prompts = [{"prompt_token_ids": [5, 17, 42, 99]}] * 3
    alone = llm.generate(prompts[:1], params, adapter="law", contrastive=OPTIONS[0], use_tqdm=False)
    together = llm.generate(prompts, params, adapter="law", contrastive=OPTIONS[0], use_tqdm=False)
    want = list(alone[0].outputs[0].token_ids)
    assert [list(o.outputs[0].token_ids) for o in together] == [want] * 3


def test_refusals_name_the_problem(llm, tiny_decisive, tmp_path):
    with pytest.raises(ValueError, match="contrastive decoding contrasts an adapter with its base model"):
        llm.generate([{"prompt_token_ids": [5, 17]}], None, adapter=None, contrastive=OPTIONS[0], use_tqdm=False)
    with pytest.raises(ValueError, match=r"contrastive.alpha: 2 is outside \(0, 1\]"):
        llm.generate([{"prompt_token_ids": [5, 17]}], None, adapter="law", contrastive={"alpha": 2}, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params given for 1 prompts"):
        llm.generate([{"prompt_token_ids": [5, 17]}], [None, None], adapter="law", use_tqdm=False)
    with pytest.raises(ValueError, match="2 contrastive options given for 1 prompts"):
        llm.generate([{"prompt_token_ids": [5, 17]}], None, adapter="law", contrastive=[None, None], use_tqdm=False)
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    for params, message in ((SamplingParams(prompt_logprobs=1), "contrastive decoding does not return prompt_logprobs"),
                            (SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a", "b"])),
                             "contrastive decoding does not take structured outputs")):
        with pytest.raises(ValueError, match=message):
            llm.generate([{"prompt_token_ids": [5, 17]}], params, adapter="law", contrastive={}, use_tqdm=False)
    with pytest.raises(ValueError, match="not prompt_embeds"):
        llm.generate([{"prompt_embeds": torch.zeros(2, 8)}], None, adapter="law", contrastive={}, use_tqdm=False)
    llm.load_adapter("law-ne", with_non_expert(tiny_decisive, "law", tmp_path / "law-ne"))
    try:
        with pytest.raises(ValueError, match="adapter 'law-ne' tunes non-expert modules"):
            llm.generate([{"prompt_token_ids": [5, 17]}], None, adapter="law-ne", contrastive={}, use_tqdm=False)
    finally:
        llm.unload_adapter("law-ne")
    assert not scheduler(llm).requests


@pytest.mark.parametrize("change, message", [
    ({"scheduler_cls": "vllm.v1.core.sched.scheduler.Scheduler"},
     "contrastive decoding needs ExpertWeave's scheduler, the default of vLLM CPU engines; this engine runs "
     "vllm.v1.core.sched.scheduler.Scheduler"),
    ({"async_scheduling": True}, "contrastive decoding needs synchronous scheduling"),
    ({"max_num_seqs": 1}, "contrastive decoding runs each request beside a base-model twin: max_num_seqs must be 2"),
])
def test_an_engine_that_cannot_pair_requests_is_named_in_the_refusal(llm, change, message):
    import copy

    from expertweave_ascend.integrations.vllm.engine import contrastive_refusal

    config = llm.llm.llm_engine.vllm_config
    assert contrastive_refusal(config) is None
    other = copy.copy(config)
    other.scheduler_config = copy.copy(config.scheduler_config)
    for key, value in change.items():
        setattr(other.scheduler_config, key, value)
    assert contrastive_refusal(other).startswith(message)


def test_an_engine_whose_kv_cache_holds_one_longest_sequence_refuses(llm):
    import copy

    from expertweave_ascend.integrations.vllm.engine import contrastive_refusal

    config = llm.llm.llm_engine.vllm_config
    short = copy.copy(config)
    short.cache_config = copy.copy(config.cache_config)
    short.cache_config.num_gpu_blocks = 256 // config.cache_config.block_size  # one max_model_len sequence
    assert "holds 256 tokens, less than two sequences of max_model_len 256" in contrastive_refusal(short)


@pytest.fixture
def chunked_prefill():
    """On this CPU vLLM turns chunked prefill off for MLA models; with MLA off (VLLM_MLA_DISABLE, read at
    engine start; vLLM caches its environment once an engine has started) it stays on."""
    from vllm import envs

    os.environ["VLLM_MLA_DISABLE"] = "1"
    envs.disable_envs_cache()
    yield
    del os.environ["VLLM_MLA_DISABLE"]
    envs.disable_envs_cache()


def test_long_prompts_in_chunks_and_preempted_pairs_equal_the_reference(tiny_decisive, references, chunked_prefill):
    """A 32-token budget per step splits every prompt longer than it (and now and then a pair) and 9 KV
    blocks of 32 tokens hold two 128-token sequences but not 12 requests with their twins: vLLM preempts."""
    import random

    adapters = {n: tiny_decisive / "adapters" / n for n in ("law", "math")}
    llm = engine(tiny_decisive / "base", adapters, max_model_len=128, kv_cache_memory_bytes=4_200_000,
                 enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=8, block_size=32)
    try:
        sched = scheduler(llm)
        assert sched.scheduler_config.enable_chunked_prefill and sched.max_num_scheduled_tokens == 32
        preempted = []
        preempt = sched._preempt_request
        sched._preempt_request = lambda request, *args, **kwargs: (preempted.append(request.request_id),
                                                                   preempt(request, *args, **kwargs))
        rng = random.Random(1)
        prompts = [[rng.randrange(3, 250) for _ in range(rng.choice([3, 7, 40, 60]))] for _ in range(12)]
        names = ["law", "math", None, "law"] * 3
        options = [OPTIONS[1], None, None, OPTIONS[2]] * 3
        from expertweave_ascend.integrations.vllm import worker

        generated = llm.llm.collective_rpc(worker.weave_of)[0].generated
        before = generated.copy()
        got = generate(llm, prompts, names, options, 40)
        assert {n: generated[n] - before[n] for n in ("law", "math", None)} == \
            {"law": 40 * names.count("law"), "math": 40 * names.count("math"), None: 40 * names.count(None)}, \
            "every token a client got counted once; twins' and dropped samples not at all"
        assert max(map(len, prompts)) > 32
        for p, n, o, g in zip(prompts, names, options, got):
            assert g == references.tokens(p, n, o, 40), (len(p), n, o)
        assert preempted and sched.pairing.dropped > 0, \
            "the run exercised preemption and the dropping of unpaired samples"
        assert not sched.requests and not sched.pairing.twins
        assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.kv_cache_manager.block_pool.num_gpu_blocks - 1
        assert sched.cache_config.enable_prefix_caching
        twin_hits_the_bases_prefix_cache(llm, sched)
    finally:
        llm.shutdown()


def twin_hits_the_bases_prefix_cache(llm, sched):
    """A prompt the base has served is cached under the base's salt: the twin finds it, its request (with
    the adapter's salt) does not."""
    prompt = list(range(3, 70))  # two full 32-token blocks
    generate(llm, [prompt], [None], [None], 2)
    add_contrastive(llm, "cached", prompt, 4)
    (primary, twin), = ((sched.requests[rid], sched.requests[tid]) for rid, tid in sched.pairing.twins.items())
    hits = [sched.kv_cache_manager.get_computed_blocks(r)[1] for r in (primary, twin)]
    assert hits == [0, 64]
    while llm.llm.llm_engine.has_unfinished_requests():
        llm.llm.llm_engine.step()
