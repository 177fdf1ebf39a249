"""perf/: the workload generator, the real-data geometries, the memory and hot-load benchmarks on the
real code path, the report, and the README table generated from committed results."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from perf import esft_data, report
from perf.workload import FIRST_TOKEN, WorkloadConfig, make_trace, s_lora_adapters

ROOT = Path(__file__).resolve().parents[1]
needs_data = pytest.mark.skipif(not (esft_data.ESFT_DATA / "expert_configs").is_dir(),
                                reason="../shared/data/esft is not beside this checkout")


def test_s_lora_popularity_follows_the_power_law():
    rng = np.random.default_rng(0)
    n, count = 10, 200_000
    for alpha in (1.0, 0.3, 0.1):
        drawn = s_lora_adapters(rng, alpha, n, count)
        assert drawn.min() >= 0 and drawn.max() <= n - 1
        # P(adapter < j) = (j / n) ** alpha for floor(power(alpha) * n)
        for j in (1, 3, 7):
            assert abs((drawn < j).mean() - (j / n) ** alpha) < 0.01
    assert np.bincount(s_lora_adapters(rng, 0.1, n, count), minlength=n).argmax() == 0


def test_trace_has_poisson_arrivals_and_fixed_lengths():
    cfg = WorkloadConfig(requests=20_000, rate=4.0, alpha=0.3, adapters=5, vocab_size=50, prompt_len=16, output_len=8,
                         seed=3)
    trace = make_trace(cfg)
    gaps = np.diff([r.arrival_s for r in trace])
    assert trace[0].arrival_s == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() - 1 / cfg.rate) < 0.01 and abs(gaps.std() - 1 / cfg.rate) < 0.01  # exponential
    assert {len(r.prompt) for r in trace} == {16} and {r.output_len for r in trace} == {8}
    tokens = {t for r in trace for t in r.prompt}
    assert min(tokens) == FIRST_TOKEN and max(tokens) == 49
    assert make_trace(cfg) == trace and make_trace(WorkloadConfig(**{**cfg.__dict__, "seed": 4})) != trace



def test_serving_blocks_keep_each_requests_arrival_within_its_block():
    from perf.serving import blocks

    trace = make_trace(WorkloadConfig(requests=10, rate=3.0, alpha=1.0, adapters=4, vocab_size=50, seed=1))
    parts = blocks(trace, 4)
    assert [len(b) for b in parts] == [4, 4, 2]
    assert [r.prompt for b in parts for r in b] == [r.prompt for r in trace]
    assert [r.adapter for b in parts for r in b] == [r.adapter for r in trace]
    for k, block in enumerate(parts):
        first = trace[4 * k].arrival_s
        assert block[0].arrival_s == 0
        assert [r.arrival_s for r in block] == pytest.approx([r.arrival_s - first for r in trace[4 * k:4 * k + 4]])

@needs_data
def test_adapter_geometries_keep_real_counts_and_differ():
    real = esft_data.real_selections()
    sets = esft_data.adapter_geometries(20)
    assert len(sets) == 20 and list(sets)[:3] == list(esft_data.TASKS)
    for task in esft_data.TASKS:
        assert sets[task] == {layer: real[task].get(layer, ()) for layer in esft_data.MOE_LAYERS}
    for name, selection in sets.items():
        task = name.split("-")[0]
        assert sorted(map(len, selection.values())) == sorted(len(real[task].get(l, ())) for l in esft_data.MOE_LAYERS)
    assert len({json.dumps(sorted(s.items())) for s in sets.values()}) == 20


@needs_data
def test_router_trace_is_real_top6():
    ids = esft_data.router_trace("law", 1)
    assert ids.shape[1] == 6 and ids.shape[0] > 8000
    assert int(ids.min()) >= 0 and int(ids.max()) <= 63
    assert all(len(set(row.tolist())) == 6 for row in ids[:500])


@needs_data
def test_memory_benchmark_accounts_through_the_allocator():
    from perf import memory

    result = memory.measure((1, 2))
    assert result["kv_bytes_per_token"] == (512 + 64) * 2 * 27  # MLA latent + rope key, bf16, 27 layers
    one, two = result["rows"]
    expert = result["expert_bytes"]
    assert one["ideal_adapter_bytes"] == one["expert_count"] * expert == 153 * expert  # law
    for row in (one, two):
        granule = result["granularity"]
        assert row["expertweave_adapter_bytes"] % granule == 0
        assert row["ideal_adapter_bytes"] <= row["expertweave_adapter_bytes"] <= row["padded_adapter_bytes"]
        assert row["fragmentation"] <= 1.02
        kv = row["kv_tokens"]
        assert kv["ideal"] >= kv["expertweave"] >= kv["padded"]
    assert one["kv_tokens"]["merged"] > one["kv_tokens"]["expertweave"] > 0
    assert two["kv_tokens"]["merged"] == 0  # two full copies do not fit in 0.9 x 64 GiB


@needs_data
def test_hotload_benchmark_loads_the_real_selection():
    from perf import hotload

    result = hotload.measure((1, 2), repeats=1)
    law = esft_data.real_selections()["law"]
    assert result["experts"] == len(law[1]) + len(law[2])
    assert result["adapter_bytes"] == result["experts"] * 3 * 2048 * 1408 * 2
    assert 0 < result["ratio"] and result["first_touch_bytes_per_s"] > 0
    assert result["host_to_device_s"] < result["load_s"], "a reload from the host tier skips the files"
    assert result["host_to_device_ratio"] == pytest.approx(
        result["adapter_bytes"] / result["host_to_device_s"] / result["copy_bytes_per_s"])
    assert result["disk_to_host_s"] > 0 and result["plain_read_s"] > 0


def test_tiering_summary_splits_hits_and_misses_and_prices_the_waits():
    from perf.tiering import summarize

    def request(sent, latency, ttft, hit, wait):
        return {"ok": True, "sent": sent, "done": sent + latency, "latency_s": latency, "ttft_s": ttft,
                "tokens": 10, "hit": hit, "wait_s": wait}

    cell = summarize([request(0.0, 1.0, 0.1, True, 0.0), request(0.5, 2.0, 0.6, False, 0.5),
                      request(1.0, 1.0, 0.2, True, 0.0), request(2.0, 2.0, 0.3, False, 0.3)])
    assert cell["hit_rate"] == 0.5 and cell["requests"] == 4
    assert cell["load_wait_share"] == pytest.approx(0.8 / 6.0)
    assert cell["mean_wait_ms_of_misses"] == pytest.approx(400.0)
    assert cell["ttft_p50_ms_hits"] == pytest.approx(100.0) and cell["ttft_p99_ms_misses"] == pytest.approx(600.0)
    assert cell["output_throughput"] == pytest.approx(40 / 4.0)
    with pytest.raises(RuntimeError, match="1 of 2 requests failed"):
        summarize([request(0.0, 1.0, 0.1, True, 0.0), {"ok": False, "status": 503, "text": "busy"}])


def test_run_rejects_unknown_sections(capsys):
    from perf import run

    with pytest.raises(SystemExit) as exit_:
        run.main(["--only", "memory,speed"])
    assert exit_.value.code == 2
    assert "--only: unknown section(s) speed" in capsys.readouterr().err


def committed_results() -> list[Path]:
    return sorted((ROOT / "perf" / "results").glob("*.json"))


def test_readme_table_is_generated_from_committed_results():
    text = (ROOT / "README.md").read_text()
    block = text.split(report.README_BEGIN, 1)[1].split(report.README_END, 1)[0]
    sources = [ROOT / source for source in re.findall(r"\[`(perf/results/[^`]+\.json)`\]", block)]
    assert sources and all(source in committed_results() for source in sources)
    assert report.README_BEGIN + block + report.README_END == report.readme_block(sources, ROOT)


@pytest.mark.parametrize("path", committed_results(), ids=lambda p: p.name)
def test_committed_summaries_regenerate_identically(path, tmp_path):
    copy = tmp_path / path.name
    copy.write_text(path.read_text())
    written = report.write(copy)
    assert copy.with_suffix(".md").read_text() == path.with_suffix(".md").read_text()
    pngs = [p for p in written if p.suffix == ".png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    linked = set(re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", path.with_suffix(".md").read_text()))
    own_plot = re.escape(path.stem) + r"-[a-z]+\.png"
    committed = {p.name for p in path.parent.glob("*.png") if re.fullmatch(own_plot, p.name)}
    assert {p.name for p in pngs} == linked == committed


def test_the_grouped_experts_stand_in_computes_the_moe_of_each_token():
    import torch

    from perf.gpu import grouped_experts

    g = torch.Generator().manual_seed(0)
    experts, hidden, inter, tokens, k = 5, 64, 32, 7, 3
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.1).to(torch.bfloat16)
    w2 = (torch.randn(experts, hidden, inter, generator=g) * 0.1).to(torch.bfloat16)
    ids = torch.randint(0, experts, (tokens, k), generator=g).to(torch.int32)
    weights = torch.rand(tokens, k, generator=g)
    expected = torch.zeros(tokens, hidden)
    for t in range(tokens):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = (x[t].float() @ w13[e].float().t()).chunk(2)
            expected[t] += weights[t, j] * (w2[e].float() @ (torch.nn.functional.silu(gate) * up))
    got = grouped_experts(x, w13, w2, weights, ids).float()
    assert torch.allclose(got, expected, atol=0.02, rtol=0.05), (got - expected).abs().max()


@needs_data
def test_the_gpu_memory_check_on_the_host_backend():
    """perf.gpu's memory section through the real allocator, on host memory at DeepSeek-V2-Lite's layer
    count and expert counts with narrower experts: mapped bytes are the invariant's, slots hold their
    data, releasing returns to the base."""
    from expertweave_ascend.capacity import DEEPSEEK_V2_LITE
    from expertweave_ascend.geometry import BaseGeometry
    from expertweave_ascend.memory import HostBackend
    from perf.gpu import measure_memory

    geometry = BaseGeometry.from_config(dict(DEEPSEEK_V2_LITE, hidden_size=256, moe_intermediate_size=176), "BF16")
    backend = HostBackend(64 << 10)
    try:
        result = measure_memory(geometry, backend, esft_data.adapter_geometries(3, geometry.moe_layers))
    finally:
        backend.close()
    assert result["exact"] and result["slots_hold_their_data"]
    assert result["mapped_after_release"] == result["base_mapped_bytes"]
    assert result["adapter_expert_bytes"] == 405 * geometry.expert_nbytes  # law + intent + summary
    assert 1.0 <= result["fragmentation"] < 1.1
    assert result["driver_free_drop_adapters"] is None  # host memory: no driver to ask


def test_the_gpu_benchmarks_refuse_to_run_without_a_gpu(capsys):
    import torch

    from perf import gpu

    if torch.cuda.is_available():
        pytest.skip("there is a GPU here")
    assert gpu.main(["--quick"]) == 2
    assert "needs an NVIDIA GPU" in capsys.readouterr().err


def test_a_ratio_interval_holds_the_true_ratio_and_narrows_with_pairs():
    from perf.stats import difference_interval, ratio_interval

    rng = np.random.default_rng(3)
    drift = 1 + 0.3 * np.sin(np.arange(200) / 7)  # the machine's speed wanders; both arms of a pair share it
    base = drift * (1 + 0.01 * rng.standard_normal(200))
    slower = 1.04 * drift * (1 + 0.01 * rng.standard_normal(200))
    wide, narrow = ratio_interval(slower[:20], base[:20]), ratio_interval(slower, base)
    assert wide.low < 1.04 < wide.high and narrow.low < 1.04 < narrow.high
    assert narrow.half_width < wide.half_width < 0.02
    same = ratio_interval(base, base)
    assert (same.value, same.low, same.high) == (1.0, 1.0, 1.0)
    gap = difference_interval(slower, base)
    assert gap.low < float(np.mean(slower - base)) < gap.high


def test_grouped_pairs_give_an_interval_that_holds_the_spread_between_instances():
    from perf.stats import ratio_interval

    rng = np.random.default_rng(5)
    instance_effect = np.repeat([1.00, 1.05, 0.97, 1.02], 10)  # each engine instance's own speed for arm a
    base = 1 + 0.01 * rng.standard_normal(40)
    slower = 1.02 * instance_effect * (1 + 0.01 * rng.standard_normal(40))
    groups = np.repeat(np.arange(4), 10)
    pooled, grouped = ratio_interval(slower, base), ratio_interval(slower, base, groups=groups)
    assert pooled.value == grouped.value
    assert grouped.half_width > 2 * pooled.half_width
    assert grouped.low < 1.02 * instance_effect.mean() < grouped.high
    with pytest.raises(ValueError, match=r"needs 2 or more groups of equal size, got sizes \[30, 10\]"):
        ratio_interval(slower, base, groups=[0] * 30 + [1] * 10)
    with pytest.raises(ValueError, match="needs one group per pair, got 3 for 40 pairs"):
        ratio_interval(slower, base, groups=[0, 1, 2])


def test_the_median_of_pair_ratios_is_not_moved_by_a_few_far_off_pairs():
    from perf.stats import median_ratio_interval, ratio_interval

    rng = np.random.default_rng(7)
    base = 1 + 0.01 * rng.standard_normal(120)
    slower = 1.03 * (1 + 0.01 * rng.standard_normal(120))
    slower[::10] *= 1.35  # one pair in ten: the machine slowed that run by a third
    mean, median = ratio_interval(slower, base), median_ratio_interval(slower, base)
    assert not mean.low < 1.03 < mean.high and mean.value > 1.05
    assert median.low < 1.03 < median.high and median.half_width < mean.half_width / 3
    grouped = median_ratio_interval(slower, base, groups=np.repeat(np.arange(6), 20))
    assert grouped.value == median.value and grouped.low < 1.03 < grouped.high
    with pytest.raises(ValueError, match="needs two equal-length series"):
        median_ratio_interval([1, 2, 3], [1, 2])


def test_an_interval_needs_paired_series():
    from perf.stats import ratio_interval

    with pytest.raises(ValueError, match=r"needs two equal-length series of 2 or more paired measurements, got \(3,\)"):
        ratio_interval([1, 2, 3], [1, 2])


def test_balanced_orders_put_every_arm_at_every_place_equally_often():
    import random

    from perf.bench_decode import balanced_orders

    arms = [f"arm {i}" for i in range(7)]
    orders = balanced_orders(list(arms), 28, random.Random(0).shuffle)
    assert len(orders) == 28 and all(sorted(order) == arms for order in orders)
    for place in range(7):
        assert sorted(order[place] for order in orders) == sorted(arms * 4)


def test_decode_pairs_arms_through_the_base_only_steps_beside_them():
    from perf.bench_decode import REFERENCE, beside

    # the machine ran twice as slow in the second round: both lanes of each run see it
    samples = {"runs": {"a": [1.1, 2.2], "b": [1.0, 2.0]}, REFERENCE: {"a": [1.0, 2.0], "b": [0.8, 1.6]}}
    assert beside(samples, "a", REFERENCE) == ([1.1, 2.2], [1.0, 2.0])
    relative_a, relative_b = beside(samples, "a", "b")
    assert relative_a == pytest.approx([1.1, 1.1]) and relative_b == pytest.approx([1.25, 1.25])
