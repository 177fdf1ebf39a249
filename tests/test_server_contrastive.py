"""Contrastive decoding over HTTP: the top-level "contrastive" field of completions and chat completions, on
`expertweave serve` over loopback (the tiny decisive model, so tokens can be compared with the reference)."""

import json
import re
import time

import pytest
import torch

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from expertweave_ascend.adapters import EsftAdapter  # noqa: E402
from expertweave_ascend.contrastive import Contrastive  # noqa: E402
from expertweave_ascend.integrations.hf import contrastive_tokens, load_model, merge_adapter  # noqa: E402

PROMPT = [5, 17, 42, 99]
OPTION = {"alpha": 0.001, "beta": 5.0}


@pytest.fixture(scope="module")
def server(decisive_server):
    """The session's server on the decisive model (conftest.py), law among its adapters."""
    return decisive_server


@pytest.fixture(scope="module")
def reference(tiny_decisive):
    base = load_model(tiny_decisive / "base", torch.float32)
    law = merge_adapter(base, EsftAdapter.open(tiny_decisive / "adapters" / "law"))
    return lambda option, count: contrastive_tokens(law, base, PROMPT, count, Contrastive(**option))


def complete(url, model="law", stream=False, **extra):
    return requests.post(f"{url}/v1/completions", stream=stream, timeout=120, json={
        "model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "stream": stream, **extra})


def events(response):
    return [json.loads(line[6:]) for line in response.iter_lines(decode_unicode=True)
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_a_completion_decodes_against_the_base_and_says_so(server, reference):
    r = complete(server, contrastive=OPTION)
    assert r.status_code == 200, r.text
    assert r.headers["x-esft-contrastive"] == "alpha=0.001, beta=5.0"
    assert r.json()["model"] == "law"
    assert r.json()["choices"][0]["token_ids"] == reference(OPTION, 12)
    plain = complete(server).json()["choices"][0]["token_ids"]
    assert plain != reference(OPTION, 12) and "x-esft-contrastive" not in complete(server).headers
    assert complete(server, contrastive=None).json()["choices"][0]["token_ids"] == plain


def test_a_streamed_completion_equals_the_reference(server, reference):
    option = {"alpha": 0.01, "beta": 2.0}
    r = complete(server, stream=True, contrastive=option)
    assert r.status_code == 200 and r.headers["x-esft-contrastive"] == "alpha=0.01, beta=2.0"
    chunks = events(r)
    assert len(chunks) > 1 and all(c["model"] == "law" for c in chunks)
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == reference(option, 12)


def test_a_streamed_chat_completion_equals_the_same_request_in_one_piece(server):
    body = {"model": "law", "messages": [{"role": "user", "content": "solve for x"}], "max_tokens": 10,
            "temperature": 0, "ignore_eos": True, "contrastive": OPTION}
    whole = requests.post(f"{server}/v1/chat/completions", json=body, timeout=120)
    assert whole.status_code == 200 and whole.headers["x-esft-contrastive"] == "alpha=0.001, beta=5.0"
    streamed = requests.post(f"{server}/v1/chat/completions", json={**body, "stream": True}, stream=True, timeout=120)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events(streamed) if c["choices"])
    assert text == whole.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize("model, extra, message", [
    ("law", {"contrastive": {"alpha": 0}}, "contrastive.alpha: 0 is outside (0, 1]"),
    ("law", {"contrastive": {"beta": -1}}, "contrastive.beta: -1 is outside [0, 100]"),
    ("law", {"contrastive": {"alpha": 0.1, "gamma": 2}}, "contrastive: unknown field(s) gamma"),
    ("law", {"contrastive": "yes"}, "contrastive: expected an object"),
    ("law", {"contrastive": {"beta": 10 ** 400}}, "contrastive.beta: expected a finite number, got 1000"),
    ("law", {"contrastive": OPTION, "prompt_logprobs": 1}, "contrastive decoding does not return prompt_logprobs"),
    ("law", {"contrastive": OPTION, "echo": True, "logprobs": 1}, "contrastive decoding does not return prompt_logp"),
    ("law", {"contrastive": OPTION, "response_format": {"type": "json_object"}},
     "contrastive decoding does not take structured outputs"),
    ("law", {"contrastive": OPTION, "prompt_embeds": "AAAA"}, "contrastive decoding runs the base model on the same"),
    ("law", {"contrastive": OPTION, "n": 2}, "contrastive decoding samples one sequence per request"),
    ("law", {"contrastive": OPTION, "use_beam_search": True}, "beam search runs outside ExpertWeave's per-step"),
    ("base", {"contrastive": OPTION}, "contrastive decoding contrasts an adapter with its base model: set \"model\""),
    ("law", {"vllm_xargs": {"esft_contrastive_beta": 0.5}}, "vllm_xargs.esft_contrastive_beta is set by the server"),
    ("law", {"vllm_xargs": {"esft_pair": ["x", "base"]}}, "vllm_xargs.esft_pair is set by the server"),
])
def test_bad_contrastive_requests_are_400(server, model, extra, message):
    r = complete(server, model=model, **extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"].startswith(message)


def engine_gauge(url: str, name: str) -> float:
    match = re.search(rf"^vllm:{name}\{{[^}}]*\}} ([0-9.e+]+)$", requests.get(f"{url}/metrics").text, re.M)
    return float(match[1])


def test_a_disconnected_contrastive_stream_leaves_nothing_running(server):
    """The twin leaves with its request (test_vllm_contrastive checks it leaves in the same step)."""
    r = complete(server, stream=True, contrastive=OPTION, max_tokens=490)
    lines = r.iter_lines()
    for _ in range(100):  # the gauges follow the engine's steps
        next(lines)
        if engine_gauge(server, "num_requests_running"):
            break
    assert engine_gauge(server, "num_requests_running") == 2, "the request runs beside its twin"
    r.close()  # the client goes away; vLLM aborts the request
    deadline = time.monotonic() + 30
    while engine_gauge(server, "num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_gauge(server, "num_requests_running") == 0
    assert engine_gauge(server, "num_requests_waiting") == 0
    assert engine_gauge(server, "kv_cache_usage_perc") == 0
