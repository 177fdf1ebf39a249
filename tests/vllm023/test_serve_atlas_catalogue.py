"""A catalogue of adapters behind one serve_atlas.sh server on vLLM 0.23 (the decisive tiny model, whose greedy
tokens do not depend on batching, so every output is compared with its transformers reference): adapters
served by name from --adapter-root, loaded when a request names them, evicted when idle into the host tier
and back, never while in use (tests/test_server_tiering.py's tests), contrastive decoding over HTTP
(tests/test_server_contrastive.py's) and an adapter that tunes non-expert modules."""

import threading

import pytest
import requests
import torch

from atlas_server import atlas_server, models
from catalogue_variants import merged_tokens
from expertweave_ascend.integrations.hf import load_model
from perf.servers import free_port
from test_server_contrastive import (  # noqa: F401  (the main suite's tests and their fixture)
    reference,
    test_a_completion_decodes_against_the_base_and_says_so,
    test_a_streamed_completion_equals_the_reference,
    test_a_streamed_chat_completion_equals_the_same_request_in_one_piece,
    test_bad_contrastive_requests_are_400,
    test_a_disconnected_contrastive_stream_leaves_nothing_running,
)
from test_server_tiering import (  # noqa: F401
    TOKENS,
    PROMPTS,
    catalogue,
    complete,
    states,
    test_200_random_requests_over_20_adapters_with_room_for_4_equal_their_merged_models,
    test_an_unload_racing_the_eviction_of_the_same_adapter_never_wedges_the_catalogue,
    test_adapters_with_requests_running_are_never_evicted_and_a_request_waits_then_gets_503,
)
from test_variants import with_non_expert

ROOM = 4


@pytest.fixture(scope="module")
def base_model(tiny_decisive):
    return load_model(tiny_decisive / "base", torch.float32)


@pytest.fixture(scope="module")
def started(tiny_decisive, catalogue, tmp_path_factory):
    """Room for 4 (rows, and slots for 4 adapters of at most 8 experts a layer); law named at start; every
    catalogued variant and law-ne (law tuning non-expert modules too) served by name from the adapter root;
    requests wait at most 2 s for their adapter."""
    root = next(iter(catalogue.values())).parent
    with_non_expert(tiny_decisive, "law", root / "law-ne")
    serve_args = ["--base-name", "base", "--adapter", f"law={tiny_decisive / 'adapters' / 'law'}",
                  "--adapter-root", str(root), "--max-adapters", str(ROOM), "--adapter-slots", str(ROOM * 8),
                  "--adapter-wait", "2", "--allow-runtime-loading"]
    vllm_args = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "2048",
                 "--kv-cache-memory-bytes", str(64 << 20)]  # long streams hold their adapters in the eviction test
    with atlas_server(tiny_decisive / "base", serve_args, vllm_args, tmp_path_factory.mktemp("catalogue-server"),
                      free_port()) as run:
        yield run


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def small(started):
    return started[0], started[2]


def loads_from(url: str, source: str) -> float:
    line = f'expertweave_adapter_loads_by_source_total{{source="{source}"}} '
    text = requests.get(f"{url}/metrics", timeout=30).text
    return next((float(entry[len(line):]) for entry in text.splitlines() if entry.startswith(line)), 0.0)


def test_an_evicted_adapter_goes_to_the_host_tier_and_comes_back_from_it(server, catalogue, base_model):
    first = sorted(catalogue)[30]
    assert complete(server, first, PROMPTS[0]) == (200, merged_tokens(base_model, catalogue[first], PROMPTS[0], TOKENS))
    for name in sorted(catalogue)[31:31 + ROOM]:
        assert complete(server, name, PROMPTS[1])[0] == 200
    assert states(server)[first] == "host"
    from_host = loads_from(server, "host")
    assert complete(server, first, PROMPTS[2]) == (200, merged_tokens(base_model, catalogue[first], PROMPTS[2], TOKENS))
    assert loads_from(server, "host") == from_host + 1 and states(server)[first] == "device"


def test_an_adapter_tuning_non_expert_modules_equals_its_merged_model_beside_the_base(server, catalogue, base_model):
    """law-ne, by name from the root: its steps run apart from the base's (ExpertWeave's scheduler on vLLM
    0.23's), each with its own non-expert weights, so both equal their references when sent together."""
    law_ne = next(iter(catalogue.values())).parent / "law-ne"
    want = {"law-ne": merged_tokens(base_model, law_ne, PROMPTS[0], TOKENS),
            "base": merged_tokens(base_model, None, PROMPTS[0], TOKENS)}
    got = {}
    threads = [threading.Thread(target=lambda m=m: got.__setitem__(m, complete(server, m, PROMPTS[0])))
               for m in ("law-ne", "base", "law-ne", "base")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert got == {m: (200, tokens) for m, tokens in want.items()}
    assert models(server)["law-ne"]["esft_state"] == "device"
    memory = requests.get(f"{server}/v1/esft_adapters", timeout=30).json()["memory"]["adapters"]
    assert memory["law-ne"]["non_expert_bytes"] > 0
