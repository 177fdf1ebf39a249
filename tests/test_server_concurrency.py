"""Exactness under concurrency on a real server: 32 concurrent mixed requests (the base and three
adapters; completions and chat; streaming and not) interleaved with load/unload cycles of a fourth
adapter. Every response's tokens equal the same request served alone, every response names the model it
asked for, and nothing answers 5xx. The model is the tiny one with decisive logits (make-tiny
--decisive), whose greedy outputs do not depend on how requests are batched; a random tiny model's
do, on plain vLLM as well."""

import random
import threading

import pytest
import torch

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from expertweave_ascend.integrations.hf import load_model  # noqa: E402
from expertweave_ascend.tiny import MARGIN  # noqa: E402
from perf.soak import MODELS, PROMPTS, ask  # noqa: E402


@pytest.fixture(scope="module")
def server(decisive_server):
    """The session's server on the decisive model (conftest.py): the base and law, math and code (MODELS),
    runtime loading on."""
    return decisive_server


def test_the_decisive_model_leads_by_its_margin_and_ignores_context(tiny_decisive):
    model = load_model(tiny_decisive / "base", torch.float32)
    assert all(not layer.self_attn.o_proj.weight.any() for layer in model.model.layers)
    with torch.no_grad():
        states = model.model(input_ids=torch.arange(3, model.config.vocab_size)[:, None]).last_hidden_state[:, -1]
        logits = model.lm_head(states)
    top = logits.topk(2, dim=-1).values
    assert ((top[:, 0] - top[:, 1]) / logits.std(-1)).min() >= 0.95 * MARGIN  # bf16 storage rounds a little


def test_concurrent_mixed_requests_equal_each_served_alone_while_an_adapter_churns(server, tiny_decisive):
    rng = random.Random(7)
    cases = [(rng.choice(MODELS), rng.choice(PROMPTS), rng.random() < 0.5, rng.random() < 0.5) for _ in range(32)]
    alone = {case: ask(server, *case) for case in set(cases)}
    assert all(status == 200 for status, _, _ in alone.values())
    outputs = {model: ask(server, model, PROMPTS[0], False, False)[2] for model in MODELS}
    assert len(set(outputs.values())) == len(MODELS), f"an adapter does not change the output: {outputs}"
    results, churn = {}, []
    stop = threading.Event()

    def churn_intent():
        path = str(tiny_decisive / "adapters" / "intent")
        while not stop.is_set():
            loaded = requests.post(f"{server}/v1/load_esft_adapter", timeout=120,
                                   json={"adapter_name": "intent", "adapter_path": path})
            served = ask(server, "intent", PROMPTS[0], False, False) if loaded.status_code == 200 else None
            unloaded = requests.post(f"{server}/v1/unload_esft_adapter", timeout=120, json={"adapter_name": "intent"})
            churn.append((loaded.status_code, served and served[0], unloaded.status_code))

    def run(i, case):
        results[i] = ask(server, *case)

    churner = threading.Thread(target=churn_intent)
    churner.start()
    threads = [threading.Thread(target=run, args=(i, case)) for i, case in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    stop.set()
    churner.join(300)
    assert churn and all(cycle == (200, 200, 200) for cycle in churn), churn
    for i, case in enumerate(cases):
        status, names, text = results[i]
        assert status == 200, (case, text)
        assert names == {case[0]}, (case, names)
        assert text == alone[case][2], (case, text, alone[case][2])
