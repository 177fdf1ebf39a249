"""Serving benchmarks over loopback HTTP, alternating A/B in one run.

overhead: base-only (plain vLLM serving the base) against ExpertWeave (`expertweave serve`, adapters
hot-loaded to 1, 5, 10, 20), the same trace for both sides: ExpertWeave's requests go to the adapters the
S-LoRA popularity draws, the base-only server gets them all as base requests.
merged: N plain vLLM servers, one per merged model, sharing the machine with a KV-cache budget of 1/N each,
against one ExpertWeave server with the same N adapters and the whole budget; skewed popularity.
Each cell replays its trace in the order given (e.g. ABBA), sides alternating, with a pause between
replays (vLLM's engine keeps polling for about a second after work); ratios are ExpertWeave / other of
the means over a side's replays, with a paired bootstrap interval over the replay pairs (stats.py).
"""

import statistics
import time
from dataclasses import dataclass

from . import servers as srv
from .client import replay
from .stats import ratio_interval
from .workload import WorkloadConfig, make_trace

IDLE_S = 2.0
KEYS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "mean_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput")
INTERVAL_KEYS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")


@dataclass(frozen=True)
class ServingConfig:
    requests: int
    rate: float
    order: str  # e.g. "ABBA": A = ExpertWeave, B = the other side
    adapter_counts: tuple[int, ...] = (1, 5, 10, 20)
    alphas: tuple[float, ...] = (1.0, 0.3, 0.1)
    merged_adapters: int = 3
    merged_alpha: float = 0.3
    prompt_len: int = 64
    output_len: int = 32
    vocab_size: int = 0  # the served model's, set by the caller: prompts draw token ids below it

    def workload(self, requests: int, rate: float, alpha: float, adapters: int, seed: int) -> WorkloadConfig:
        return WorkloadConfig(requests, rate, alpha, adapters, self.vocab_size, self.prompt_len, self.output_len, seed)


def _cell(trace, sides: dict, order: str) -> dict:
    runs = {"A": [], "B": []}
    for side in order:
        time.sleep(IDLE_S)
        runs[side].append(replay(trace, sides[side]))
    mean = {side: {k: statistics.fmean(r[k] for r in rs) for k in KEYS} for side, rs in runs.items()}
    ratio = {k: mean["A"][k] / mean["B"][k] if mean["B"][k] else None for k in KEYS}
    cell = {"expertweave": mean["A"], "other": mean["B"], "ratio": ratio, "runs": runs}
    if len(runs["A"]) >= 2:  # the i-th replay of each side are a pair (ABBA: neighbours in time)
        cell["intervals"] = {k: ratio_interval([r[k] for r in runs["A"]], [r[k] for r in runs["B"]]).to_json()
                             for k in INTERVAL_KEYS}
    return cell


def warm_up(cfg: ServingConfig, server: srv.Server, model: str) -> None:
    trace = make_trace(cfg.workload(requests=4, rate=100.0, alpha=1.0, adapters=1, seed=99))
    replay(trace, lambda r: (server.url, model))


def overhead(cfg: ServingConfig, base: srv.Server, weave: srv.Server, adapters: dict, progress) -> dict:
    names = list(adapters)
    loaded, cells, load_s = 0, [], {}
    warm_up(cfg, base, base.model)
    warm_up(cfg, weave, weave.model)
    for n in cfg.adapter_counts:
        while loaded < n:
            start = time.perf_counter()
            srv.post(weave, "/v1/load_esft_adapter", {"adapter_name": names[loaded],
                                                      "adapter_path": str(adapters[names[loaded]])})
            load_s[names[loaded]] = time.perf_counter() - start
            loaded += 1
        for alpha in cfg.alphas:
            trace = make_trace(cfg.workload(cfg.requests, cfg.rate, alpha, n, seed=1000 * n + int(alpha * 100)))
            sides = {"A": lambda r: (weave.url, names[r.adapter]), "B": lambda r: (base.url, base.model)}
            cell = _cell(trace, sides, cfg.order)
            cell.update(adapters=n, alpha=alpha, requests_per_adapter=_histogram(trace, n))
            cells.append(cell)
            progress(f"overhead: {n} adapters, alpha {alpha}: TTFT x{cell['ratio']['mean_ttft_ms']:.3f}, "
                     f"TPOT x{cell['ratio']['mean_tpot_ms']:.3f}, "
                     f"throughput x{cell['ratio']['output_throughput']:.3f}")
    return {"cells": cells, "hot_load_s": load_s}


def merged(cfg: ServingConfig, weave: srv.Server, merged_servers: dict[str, srv.Server], progress) -> dict:
    """Unloads every ExpertWeave adapter but the merged servers' ones first."""
    names = list(merged_servers)
    for name in srv.get(weave, "/v1/esft_adapters")["adapters"]:
        if name not in merged_servers:
            srv.post(weave, "/v1/unload_esft_adapter", {"adapter_name": name})
    for server in merged_servers.values():
        warm_up(cfg, server, server.model)
    trace = make_trace(cfg.workload(cfg.requests, cfg.rate, cfg.merged_alpha, len(names), seed=7))
    sides = {"A": lambda r: (weave.url, names[r.adapter]),
             "B": lambda r: (merged_servers[names[r.adapter]].url, merged_servers[names[r.adapter]].model)}
    cell = _cell(trace, sides, cfg.order)
    cell.update(adapters=len(names), alpha=cfg.merged_alpha, requests_per_adapter=_histogram(trace, len(names)))
    progress(f"merged: {len(names)} merged engines vs ExpertWeave: "
             f"throughput x{cell['ratio']['output_throughput']:.3f}, TTFT x{cell['ratio']['mean_ttft_ms']:.3f}")
    return cell


def _histogram(trace, n: int) -> list[int]:
    counts = [0] * n
    for r in trace:
        counts[r.adapter] += 1
    return counts
