"""`expertweave serve` end to end over loopback HTTP: the real vLLM OpenAI server with the plugin."""

import json
import tempfile
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from expertweave_ascend.adapters import EsftAdapter  # noqa: E402
from serving import ENGINE_ARGS, running_server  # noqa: E402

PROMPT = "define a function that returns the sum"


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "serve.log"


@pytest.fixture(scope="module")
def server(tiny, log):
    argv = ["serve", str(tiny / "base"), "--adapter", f"law={tiny / 'adapters' / 'law'}",
            "--adapter", f"math={tiny / 'adapters' / 'math'}", "--max-adapters", "3", "--allow-runtime-loading",
            "--", *ENGINE_ARGS]
    with running_server(argv, log) as url:
        yield url


def complete(url, model, prompt="the court held that a contract requires", max_tokens=16, **extra):
    return requests.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                         "temperature": 0, "ignore_eos": True, **extra}, timeout=120)


def test_models_lists_base_and_adapters(server):
    ids = {m["id"] for m in requests.get(f"{server}/v1/models").json()["data"]}
    assert {"base", "law", "math"} <= ids


def test_completions_per_adapter(server):
    base = complete(server, "base").json()
    law = complete(server, "law").json()
    assert base["model"] == "base" and law["model"] == "law"
    assert law["choices"][0]["text"] != base["choices"][0]["text"]
    assert complete(server, "law").json()["choices"][0]["text"] == law["choices"][0]["text"]


def test_unknown_model_is_openai_404(server):
    r = complete(server, "nope")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "NotFoundError" and "nope" in r.json()["error"]["message"]


def test_xargs_cannot_select_an_adapter(server):
    r = complete(server, "base", vllm_xargs={"esft_adapter": "law"})
    assert r.status_code == 400 and "vllm_xargs.esft_adapter is set by the server" in r.json()["error"]["message"]


def raw_post(url: str, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, dict]:
    """A POST with exactly these headers, repeated ones included (requests would merge them)."""
    import http.client
    from urllib.parse import urlsplit

    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    connection.putrequest("POST", path)
    for key, value in headers:
        connection.putheader(key, value)
    connection.endheaders(body)
    response = connection.getresponse()
    answer = json.loads(response.read() or b"{}")
    connection.close()
    return response.status, answer


def test_a_request_the_front_end_and_vllm_could_read_two_ways_is_refused(server):
    """On 0071847 JSON then text Content-Type skipped the adapter middleware (it read the last header, vLLM
    the first): vllm_xargs selected law under the base's name, and `esft_pair: ["x"]` stopped the server."""
    forged = json.dumps({"model": "base", "prompt": PROMPT, "max_tokens": 4,
                         "vllm_xargs": {"esft_adapter": "law"}}).encode()
    status, answer = raw_post(server, "/v1/completions", [("Content-Type", "application/json"),
                                                          ("Content-Type", "text/plain"),
                                                          ("Content-Length", str(len(forged)))], forged)
    assert status == 400 and answer["error"]["message"].startswith("the Content-Type header is given 2 times")
    for content_type in ("text/plain", "application/vnd.api+json"):
        pair = json.dumps({"model": "law", "prompt": PROMPT, "max_tokens": 4,
                           "vllm_xargs": {"esft_pair": ["x"]}}).encode()
        status, answer = raw_post(server, "/v1/completions", [("Content-Type", content_type),
                                                              ("Content-Length", str(len(pair)))], pair)
        assert status == 400 and "vllm_xargs.esft_pair is set by the server" in answer["error"]["message"]
    assert complete(server, "law").status_code == 200  # still serving


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": PROMPT}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_beam_search_for_an_adapter_is_400_not_the_base_under_its_name(server, path, body):
    r = requests.post(f"{server}{path}", timeout=60, json={"model": "law", "use_beam_search": True, "n": 2,
                                                            "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith("beam search runs outside ExpertWeave's per-step routing")


@pytest.mark.parametrize("body", [b"{no", b"[1, 2]", b'{"model": "law", "prompt": 5}',
                                  b'{"model": "law", "prompt": "x", "max_tokens": "lots"}',
                                  b'{"model": "base", "prompt": "x", "temperature": -3}'])
def test_malformed_completion_bodies_are_400_without_a_traceback(server, log, body):
    r = requests.post(f"{server}/v1/completions", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    port = server.rsplit(":", 1)[1]
    kept = Path(tempfile.gettempdir()).glob(f"expertweave-serve-{port}-*/tracebacks.log")  # launch.tracebacks_file's
    assert "Traceback" not in log.read_text() and not any("Traceback" in path.read_text() for path in kept)


def test_models_lists_each_adapter_with_its_content_hash(server, tiny):
    cards = {m["id"]: m for m in requests.get(f"{server}/v1/models").json()["data"]}
    listed = requests.get(f"{server}/v1/esft_adapters").json()["adapters"]
    memory = requests.get(f"{server}/v1/esft_adapters").json()["memory"]["adapters"]
    for name in ("law", "math"):
        assert cards[name]["parent"] == "base" and len(cards[name]["esft_sha256"]) == 64
        assert cards[name]["esft_sha256"] == listed[name]["sha256"] == memory[name]["sha256"]
    assert cards["law"]["esft_sha256"] != cards["math"]["esft_sha256"]
    assert str(tiny) not in json.dumps([cards["law"], cards["math"]]), "adapter cards show no server path"


@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"input": "hello"}),
    ("/v1/chat/completions/batch", {"messages": [[{"role": "user", "content": "hi"}]]}),
    ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}),
    ("/invocations", {"prompt": "hello", "max_tokens": 4}),
    ("/v1/embeddings", {"input": "hello"}),
    ("/tokenize", {"prompt": "hello"}),
])
def test_routes_without_adapter_support_refuse_adapter_names(server, path, body):
    r = requests.post(f"{server}{path}", json={"model": "law", **body}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == (f"{path} serves the base model only; ESFT adapter 'law' is served on "
                                            "/v1/completions and /v1/chat/completions")


def test_chat_streaming_names_the_adapter(server):
    r = requests.post(f"{server}/v1/chat/completions", stream=True, timeout=120, json={
        "model": "math", "messages": [{"role": "user", "content": "solve for x"}], "max_tokens": 8, "stream": True})
    assert r.status_code == 200
    chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert chunks and all(c["model"] == "math" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text


def test_concurrent_requests_for_different_adapters(server):
    # This random tiny model's greedy outputs change with how requests are batched (on plain vLLM too),
    # so here only names and lengths are checked; test_server_concurrency.py compares tokens with each
    # request served alone, on the tiny model with decisive logits.
    results, errors = {}, []

    def worker(i, model):
        try:
            response = complete(server, model, prompt=PROMPT, max_tokens=8)
            assert response.status_code == 200, response.text
            body = response.json()
            results[i] = (model, body["model"], body["choices"][0]["text"], body["usage"]["completion_tokens"])
        except Exception as e:  # collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i, m)) for i, m in enumerate(["base", "law", "math"] * 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors
    assert len(results) == 12
    for model, named, text, tokens in results.values():
        assert named == model and text and tokens == 8


def test_bad_adapter_loads_are_400_and_disturb_nothing(server, adapter_copy):
    before = complete(server, "law", max_tokens=64).json()["choices"][0]["text"]
    stream = requests.post(f"{server}/v1/completions", stream=True, timeout=120, json={
        "model": "law", "prompt": "the court held that a contract requires", "max_tokens": 64, "temperature": 0,
        "ignore_eos": True, "stream": True})
    bad = adapter_copy("code")
    (bad / "model.safetensors").write_bytes(b"\x00" * 10)
    r = requests.post(f"{server}/v1/load_esft_adapter", json={"adapter_name": "code", "adapter_path": str(bad)})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith(f"{bad / 'model.safetensors'}: not a valid safetensors file")
    for path in ("/nonexistent", "/etc", "/etc/hostname", "/proc/self/root", str(bad / "model.safetensors")):
        r = requests.post(f"{server}/v1/load_esft_adapter", json={"adapter_name": "x", "adapter_path": path})
        assert r.status_code == 400 and r.json()["error"]["message"] == f"{path}: no ESFT adapter this server can " \
            "read there", "without --adapter-root an answer tells nothing of which server paths exist"
    text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in stream.iter_lines(decode_unicode=True)
                   if line.startswith("data: ") and line != "data: [DONE]")
    assert text == before
    listed = requests.get(f"{server}/v1/esft_adapters").json()["adapters"]
    assert "code" not in listed and all("path" not in info for info in listed.values()), "no server paths listed"


@pytest.mark.parametrize("route", ["load_esft_adapter", "unload_esft_adapter"])
@pytest.mark.parametrize("body", [b"[1, 2]", b'"law"', b"[" * 50_000 + b"]" * 50_000, b"{no"])
def test_malformed_load_and_unload_bodies_are_400(server, route, body):
    r = requests.post(f"{server}/v1/{route}", data=body, headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "expected a JSON object" in r.json()["error"]["message"]


def test_an_adapter_with_an_hf_style_name_is_served(server, tiny):
    name = "deepseek-ai/ESFT-code@v1"
    r = requests.post(f"{server}/v1/load_esft_adapter",
                      json={"adapter_name": name, "adapter_path": str(tiny / "adapters" / "code")})
    assert r.status_code == 200, r.text
    assert complete(server, name).json()["model"] == name
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": name, "timeout": 0})
    assert r.status_code == 200, r.text


def test_the_same_adapter_under_a_second_name_maps_nothing_and_is_listed_as_shared(server, tiny):
    before = requests.get(f"{server}/v1/esft_adapters").json()["memory"]
    r = requests.post(f"{server}/v1/load_esft_adapter",
                      json={"adapter_name": "law-again", "adapter_path": str(tiny / "adapters" / "law")})
    assert r.status_code == 200, r.text
    try:
        memory = requests.get(f"{server}/v1/esft_adapters").json()["memory"]
        assert memory["adapter_mapped_bytes"] == before["adapter_mapped_bytes"]
        assert memory["adapter_slot_bytes"] == before["adapter_slot_bytes"]
        law, again = memory["adapters"]["law"], memory["adapters"]["law-again"]
        assert again["shared_slots"] == law["shared_slots"] == law["experts"]
        assert memory["saved_bytes"] == before["saved_bytes"] + law["bytes"]
        assert again["saved_bytes"] + law["saved_bytes"] == law["bytes"]
        assert complete(server, "law-again").json()["choices"][0]["text"] == complete(server, "law").json()[
            "choices"][0]["text"]
    finally:
        assert requests.post(f"{server}/v1/unload_esft_adapter",
                             json={"adapter_name": "law-again"}).status_code == 200
    assert requests.get(f"{server}/v1/esft_adapters").json()["memory"]["adapters"]["law"]["shared_slots"] == 0


def test_an_adapter_tuning_non_expert_modules_is_served_beside_the_base(server, tiny, tmp_path):
    """Its requests and the base's, sent together, run in steps of their own (ExpertWeave's scheduler, the
    server's default on the CPU), so each gets what it gets served alone; the client cannot pick a variant."""
    from test_variants import with_non_expert

    path = with_non_expert(tiny, "law", tmp_path / "law-ne")
    r = requests.post(f"{server}/v1/load_esft_adapter", json={"adapter_name": "law-ne", "adapter_path": str(path)})
    assert r.status_code == 200, r.text
    try:
        alone = {m: complete(server, m, max_tokens=12).json()["choices"][0]["text"] for m in ("law-ne", "base", "law")}
        assert alone["law-ne"] != alone["law"]
        together = {}
        threads = [threading.Thread(target=lambda m=m: together.__setitem__(
            m, complete(server, m, max_tokens=12).json()["choices"][0]["text"])) for m in ("law-ne", "base")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert together == {m: alone[m] for m in ("law-ne", "base")}
        memory = requests.get(f"{server}/v1/esft_adapters").json()["memory"]["adapters"]
        assert memory["law-ne"]["non_expert_bytes"] > 0 and memory["law"]["non_expert_bytes"] == 0
        r = complete(server, "base", vllm_xargs={"esft_variant": "law-ne"})
        assert r.status_code == 400 and "vllm_xargs.esft_variant is set by the server" in r.text
    finally:
        assert requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "law-ne"}).status_code == 200


def test_load_serve_unload_at_run_time(server, tiny):
    report = requests.get(f"{server}/v1/esft_adapters").json()
    assert set(report["adapters"]) == {"law", "math"}
    mapped_before = report["memory"]["adapter_mapped_bytes"]
    r = requests.post(f"{server}/v1/load_esft_adapter",
                      json={"adapter_name": "code", "adapter_path": str(tiny / "adapters" / "code")})
    assert r.status_code == 200
    assert r.json()["experts"] == EsftAdapter.open(tiny / "adapters" / "code").num_experts
    assert complete(server, "code").json()["model"] == "code"
    assert "code" in {m["id"] for m in requests.get(f"{server}/v1/models").json()["data"]}
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "code"})
    assert r.status_code == 200
    assert complete(server, "code").status_code == 404
    report = requests.get(f"{server}/v1/esft_adapters").json()
    assert set(report["adapters"]) == {"law", "math"}
    assert report["memory"]["adapter_mapped_bytes"] == mapped_before
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "code"})
    assert r.status_code == 404


def test_benchmark_client_replays_a_trace_with_vllm_metrics(server):
    """perf's client (vLLM's own request function and metrics) against this server, adapters by model name."""
    from perf.client import replay
    from perf.workload import WorkloadConfig, make_trace

    trace = make_trace(WorkloadConfig(requests=6, rate=20.0, alpha=1.0, adapters=3, vocab_size=100, prompt_len=12,
                                      output_len=5))
    names = ["base", "law", "math"]
    metrics = replay(trace, lambda r: (server, names[r.adapter]))
    assert metrics["completed"] == 6 and metrics["failed"] == 0
    assert metrics["total_input"] == 6 * 12 and metrics["total_output"] == 6 * 5
    assert 0 < metrics["mean_ttft_ms"] <= metrics["p99_ttft_ms"] and metrics["mean_tpot_ms"] > 0
    assert metrics["output_throughput"] == pytest.approx(30 / metrics["duration_s"])
    assert metrics["mean_e2el_ms"] > metrics["mean_ttft_ms"]


# -- unload and request lifetime: the workers count each adapter's requests; unload waits for them ---------
LONG = 480  # tokens: a stream that outlasts the unload calls below (the server's max-model-len is 512)

def stream(url, model, max_tokens, prompt="the court held that a contract requires"):
    return requests.post(f"{url}/v1/completions", stream=True, timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
        "stream": True})


def chunks(response):
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


def adapters(url) -> dict:
    return requests.get(f"{url}/v1/esft_adapters").json()


def reload(url, tiny, name):
    r = requests.post(f"{url}/v1/load_esft_adapter",
                      json={"adapter_name": name, "adapter_path": str(tiny / "adapters" / name)})
    assert r.status_code == 200, r.text


def test_unload_during_a_stream_waits_and_the_stream_ends_with_the_adapters_tokens(server, tiny):
    want = complete(server, "law", max_tokens=LONG).json()["choices"][0]["text"]
    memory = adapters(server)["memory"]
    response = stream(server, "law", LONG)
    received = chunks(response)
    text = [next(received)["choices"][0]["text"]]
    unloaded = {}

    def unload():
        r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "law"}, timeout=300)
        unloaded.update(status=r.status_code, at=time.monotonic())

    thread = threading.Thread(target=unload)
    thread.start()
    time.sleep(0.3)
    assert complete(server, "law").status_code == 409, "a new request was admitted while unloading"
    second = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "law"}, timeout=60)
    assert second.status_code == 409 and second.json()["error"]["message"] == "adapter 'law' is already being unloaded"
    text += [c["choices"][0]["text"] for c in received]
    ended = time.monotonic()
    thread.join(300)
    assert unloaded["status"] == 200 and unloaded["at"] >= ended
    assert "".join(text) == want
    report = adapters(server)
    assert "law" not in report["adapters"]
    assert report["memory"]["adapter_expert_bytes"] == memory["adapter_expert_bytes"] - memory["adapters"]["law"]["bytes"]
    reload(server, tiny, "law")
    assert adapters(server)["memory"]["adapter_mapped_bytes"] == memory["adapter_mapped_bytes"]


def test_unload_that_times_out_is_409_and_changes_nothing(server):
    before = adapters(server)
    response = stream(server, "math", LONG)
    received = chunks(response)
    next(received)
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "math", "timeout": 0.5})
    assert r.status_code == 409
    message = r.json()["error"]["message"]
    assert "adapter 'math' still has 1 request(s) running" in message and "not unloaded" in message
    assert len(list(received)) > 10, "the stream did not go on"
    after = adapters(server)
    assert after["memory"] == before["memory"] and set(after["adapters"]) == set(before["adapters"])
    assert complete(server, "math").status_code == 200


def test_a_disconnected_stream_is_waited_for_and_nothing_leaks(server, tiny):
    before = adapters(server)
    response = stream(server, "law", LONG)
    next(chunks(response))
    response.close()  # the client goes away; vLLM aborts the request
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "law", "timeout": 60})
    assert r.status_code == 200, r.text
    report = adapters(server)
    assert "law" not in report["adapters"]
    assert all(a["requests"] == 0 for a in report["adapters"].values())
    reload(server, tiny, "law")
    after = adapters(server)
    assert after["memory"]["adapter_mapped_bytes"] == before["memory"]["adapter_mapped_bytes"]
    assert after["adapters"]["law"]["requests"] == 0
    assert complete(server, "law").json()["model"] == "law"


# -- metrics ------------------------------------------------------------------------------------------------
def metric(url: str, name: str, adapter: str | None = None) -> float:
    """One sample of vLLM's /metrics (0 when absent)."""
    import re

    labels = "" if adapter is None else r'\{adapter="' + re.escape(adapter) + r'"\}'
    match = re.search(rf"^{name}{labels} ([0-9.e+]+)$", requests.get(f"{url}/metrics").text, re.M)
    return float(match[1]) if match else 0.0


def settled(read, expected, within_s: float = 10.0):
    """read() once it equals expected (the workers' figures reach /metrics within a refresh), else its last."""
    deadline = time.monotonic() + within_s
    while (value := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_metrics_count_requests_and_generated_tokens_per_adapter(server):
    def counts():
        return {m: (metric(server, "expertweave_requests_total", m),
                    metric(server, "expertweave_generated_tokens_total", m)) for m in ("base", "law")}

    before = settled(counts, None, within_s=1.5)  # whatever earlier tests left, once refreshed
    assert complete(server, "law", max_tokens=16).status_code == 200
    assert complete(server, "law", max_tokens=5).status_code == 200
    assert complete(server, "base", max_tokens=7).status_code == 200
    expected = {"law": (before["law"][0] + 2, before["law"][1] + 21),
                "base": (before["base"][0] + 1, before["base"][1] + 7)}
    assert settled(counts, expected) == expected
    memory = requests.get(f"{server}/v1/esft_adapters").json()["memory"]["adapters"]
    assert metric(server, "expertweave_adapter_resident_bytes", "law") == memory["law"]["bytes"]


def test_metrics_count_loads_and_unloads_and_time_them(server, tiny):
    unloads = metric(server, "expertweave_adapter_unloads_total")
    timed = metric(server, "expertweave_adapter_load_seconds_count")
    r = requests.post(f"{server}/v1/load_esft_adapter",
                      json={"adapter_name": "code", "adapter_path": str(tiny / "adapters" / "code")})
    assert r.status_code == 200, r.text
    assert settled(lambda: metric(server, "expertweave_adapter_resident_bytes", "code"), r.json()["bytes"]) \
        == r.json()["bytes"]
    assert metric(server, "expertweave_adapter_loads_total", "code") == 1
    assert metric(server, "expertweave_adapter_load_seconds_count") == timed + 1
    assert requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "code"}).status_code == 200
    assert metric(server, "expertweave_adapter_unloads_total") == unloads + 1
    assert metric(server, "expertweave_adapter_loads_total", "code") == 0, "an unloaded adapter's series go"
    assert metric(server, "expertweave_adapter_resident_bytes", "code") == 0


def test_metrics_label_sets_stay_bounded_over_many_loads(server, tiny):
    """On 0071847 every adapter ever loaded kept its series: 200 loads took /metrics from 11 to 211 label sets."""
    import re

    def label_sets():
        return len(set(re.findall(r'adapter="[^"]*"', requests.get(f"{server}/metrics").text)))

    before = label_sets()
    for i in range(12):
        name = f"churn-{i}"
        r = requests.post(f"{server}/v1/load_esft_adapter",
                          json={"adapter_name": name, "adapter_path": str(tiny / "adapters" / "code")})
        assert r.status_code == 200, r.text
        assert complete(server, name, max_tokens=2).status_code == 200
        assert requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": name}).status_code == 200
    time.sleep(1.5)  # one refresh of the workers' figures
    assert label_sets() <= before


def test_no_client_input_gets_a_500_and_the_server_keeps_serving(server, tiny, log, capsys):
    """Item 6 of the trust pass: random bodies, fields, header shapes and name lengths over every route."""
    from http_fuzz import fuzz

    paths = [str(tiny / "adapters" / name) for name in ("code", "law")]
    statuses = fuzz(server, ["law", "math", "code", "nope"], paths, count=400, seed=29)
    with capsys.disabled():
        print(f"\nHTTP fuzz (runtime loading, no adapter root): {sum(statuses.values())} requests, statuses "
              f"{dict(sorted(statuses.items()))}")
    assert not [status for status in statuses if status >= 500], statuses
    for name in set(requests.get(f"{server}/v1/esft_adapters").json()["adapters"]) - {"law", "math"}:
        assert requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": name}).status_code == 200
    assert complete(server, "law").status_code == 200
    assert "Traceback" not in log.read_text()
