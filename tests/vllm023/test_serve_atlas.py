"""`expertweave serve` on vLLM 0.23, started by scripts/serve_atlas.sh as on an Atlas server, at tensor
parallelism 2: the main suite's server tests (tests/test_server.py: every route, the middleware, admission,
runtime load and unload, unload waiting for a running stream, memory reports, metrics) run again against
it, with the server's ranks agreeing on every load and unload; then what only this file checks."""

import re

import pytest
import requests

from atlas_server import atlas_server, models
from perf.servers import free_port
from serving import ENGINE_ARGS
from test_server import (  # noqa: F401  (the main suite's tests, run here against the 0.23 server)
    test_models_lists_base_and_adapters,
    test_completions_per_adapter,
    test_unknown_model_is_openai_404,
    test_xargs_cannot_select_an_adapter,
    test_a_request_the_front_end_and_vllm_could_read_two_ways_is_refused,
    test_beam_search_for_an_adapter_is_400_not_the_base_under_its_name,
    test_malformed_completion_bodies_are_400_without_a_traceback,
    test_models_lists_each_adapter_with_its_content_hash,
    test_routes_without_adapter_support_refuse_adapter_names,
    test_chat_streaming_names_the_adapter,
    test_concurrent_requests_for_different_adapters,
    test_bad_adapter_loads_are_400_and_disturb_nothing,
    test_malformed_load_and_unload_bodies_are_400,
    test_an_adapter_with_an_hf_style_name_is_served,
    test_the_same_adapter_under_a_second_name_maps_nothing_and_is_listed_as_shared,
    test_an_adapter_tuning_non_expert_modules_is_served_beside_the_base,
    test_load_serve_unload_at_run_time,
    test_benchmark_client_replays_a_trace_with_vllm_metrics,
    test_unload_during_a_stream_waits_and_the_stream_ends_with_the_adapters_tokens,
    test_unload_that_times_out_is_409_and_changes_nothing,
    test_a_disconnected_stream_is_waited_for_and_nothing_leaks,
    test_metrics_count_requests_and_generated_tokens_per_adapter,
    test_metrics_count_loads_and_unloads_and_time_them,
    test_metrics_label_sets_stay_bounded_over_many_loads,
)

TP = 2


@pytest.fixture(scope="module")
def started(tiny, tmp_path_factory):
    """The server test_server.py starts (law and math, room for 3, runtime loading), through serve_atlas.sh."""
    serve_args = ["--adapter", f"law={tiny / 'adapters' / 'law'}", "--adapter", f"math={tiny / 'adapters' / 'math'}",
                  "--max-adapters", "3", "--allow-runtime-loading", "--tp", str(TP)]
    with atlas_server(tiny / "base", serve_args, ENGINE_ARGS, tmp_path_factory.mktemp("atlas"), free_port()) as run:
        yield run


@pytest.fixture(scope="module")
def server(started):
    return started[0]


@pytest.fixture(scope="module")
def log(started):
    return started[2]


def test_serve_atlas_reports_the_models_and_the_engine_it_started(started, tiny):
    url, report, log = started
    command = next(line for line in report.splitlines() if line.startswith("+ "))
    assert f"serve {tiny / 'base'} --host 127.0.0.1" in command
    assert command.endswith(f"-- --tensor-parallel-size {TP} --data-parallel-size 1 {' '.join(ENGINE_ARGS)}")
    assert f"ExpertWeave is serving at {url}" in report and '"esft_sha256"' in report and '"memory"' in report
    assert {"base", "law", "math"} <= set(models(url))
    assert "Initializing a V1 LLM engine (v0.23.0)" in log.read_text()


def test_every_rank_holds_the_same_adapters(server, tiny):
    """The front-end's report is rank 0's; each load answer was agreed by both ranks (agreement.py), and
    the engine's metrics count each adapter once."""
    adapters = requests.get(f"{server}/v1/esft_adapters", timeout=30).json()["adapters"]
    assert set(adapters) == {"law", "math"}
    r = requests.post(f"{server}/v1/load_esft_adapter", json={"adapter_name": "again", "adapter_path": str(
        tiny / "adapters" / "law")}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["sha256"] == adapters["law"]["sha256"]
    assert requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "again"}).status_code == 200


def prefix_cache_hits(url: str) -> float:
    text = requests.get(f"{url}/metrics", timeout=30).text
    return sum(float(m[1]) for m in re.finditer(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_each_adapters_prefix_cache_is_its_own(server):
    """Salts by content: the same prompt hits the prefix cache only after a request of the same model (its
    297 tokens fill at least two KV blocks)."""
    prompt = list(range(3, 300))

    def hits_of(model: str) -> float:
        before = prefix_cache_hits(server)
        r = requests.post(f"{server}/v1/completions", timeout=120, json={
            "model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0})
        assert r.status_code == 200, r.text
        return prefix_cache_hits(server) - before

    hits_of("base")
    assert hits_of("law") == 0 and hits_of("math") == 0
    assert hits_of("law") > 0 and hits_of("base") > 0


def test_a_client_salt_is_kept_and_the_adapter_marker_refused(server):
    body = {"model": "law", "prompt": "the court held", "max_tokens": 2, "temperature": 0}
    r = requests.post(f"{server}/v1/completions", json={**body, "cache_salt": "tenant-1"}, timeout=60)
    assert r.status_code == 200, r.text
    r = requests.post(f"{server}/v1/completions", json={**body, "cache_salt": "x~esft:abc"}, timeout=60)
    assert r.status_code == 400 and "cache_salt may not contain '~esft:'" in r.json()["error"]["message"]
