"""Serving benchmarks over loopback HTTP, alternating A/B in one run.

overhead: what serving adapters costs one ExpertWeave server (`expertweave serve`, adapters hot-loaded to
each count): the same trace sent as adapter requests (A: each request to the adapter the S-LoRA popularity
draws) and as base requests (B: every request to the base), interleaved. Each trace is cut into blocks of
consecutive requests, and each block is replayed as A and as B back to back (AB, then BA for the next
block), its arrival times kept; a block pair shares the server and the machine's state of those seconds,
which replays of whole traces on two servers do not (one replay's mean TPOT moves by ~7% against the next
here). Ratios are A / B of the means over a cell's blocks, with a paired bootstrap interval over the block
pairs (stats.py); the headline pools the pairs of every popularity. The mechanism's fixed cost (ExpertWeave
serving base requests against plain vLLM) is the decode benchmark's fixed-cost arm, not measured here.
merged: N plain vLLM servers, one per merged model, sharing the machine with a KV-cache budget of 1/N each,
against one ExpertWeave server with the same N adapters and the whole budget; skewed popularity. The cell
replays its whole trace in the order given (e.g. ABBA), sides alternating, with a pause between replays
(vLLM's engine keeps polling for about a second after work), and pairs the replays.
"""

import statistics
import time
from dataclasses import dataclass, replace

from . import servers as srv
from .client import replay
from .stats import ratio_interval
from .workload import WorkloadConfig, make_trace

IDLE_S = 2.0
BLOCK_PAUSE_S = 0.2  # between two block replays on one server: the last request's response has come
KEYS = ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "mean_itl_ms", "mean_e2el_ms", "request_throughput", "output_throughput", "total_token_throughput")
INTERVAL_KEYS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput")


@dataclass(frozen=True)
class ServingConfig:
    requests: int  # per trace
    rate: float
    traces: int  # per popularity in the overhead cells, each drawn anew
    order: str  # the merged cell's replays, e.g. "ABBA": A = ExpertWeave, B = the merged engines
    block: int = 8  # requests per block of the overhead cells
    adapter_counts: tuple[int, ...] = (20,)
    alphas: tuple[float, ...] = (1.0, 0.3, 0.1)
    merged_adapters: int = 3
    merged_alpha: float = 0.3
    prompt_len: int = 64
    output_len: int = 32
    vocab_size: int = 0  # the served model's, set by the caller: prompts draw token ids below it

    def workload(self, requests: int, rate: float, alpha: float, adapters: int, seed: int) -> WorkloadConfig:
        return WorkloadConfig(requests, rate, alpha, adapters, self.vocab_size, self.prompt_len, self.output_len, seed)


def _summary(runs: dict) -> dict:
    """Each side's means over its replays, their ratios A / B, and intervals where there are 2+ pairs (the i-th
    replay of each side are a pair)."""
    mean = {side: {k: statistics.fmean(r[k] for r in rs) for k in KEYS} for side, rs in runs.items()}
    ratio = {k: mean["A"][k] / mean["B"][k] if mean["B"][k] else None for k in KEYS}
    cell = {"expertweave": mean["A"], "other": mean["B"], "ratio": ratio, "runs": runs}
    if len(runs["A"]) >= 2:
        cell["intervals"] = {k: ratio_interval([r[k] for r in runs["A"]], [r[k] for r in runs["B"]]).to_json()
                             for k in INTERVAL_KEYS}
    return cell


def _cell(trace, sides: dict, order: str) -> dict:
    runs = {"A": [], "B": []}
    for side in order:
        time.sleep(IDLE_S)
        runs[side].append(replay(trace, sides[side]))
    return _summary(runs)


def blocks(trace: list, size: int) -> list[list]:
    """The trace in runs of `size` consecutive requests, each block's arrivals from its first request."""
    out = []
    for first in range(0, len(trace), size):
        block = trace[first:first + size]
        out.append([replace(r, arrival_s=r.arrival_s - block[0].arrival_s) for r in block])
    return out


def _interleaved(traces: list, sides: dict, size: int) -> dict:
    runs = {"A": [], "B": []}
    for k, block in enumerate(b for trace in traces for b in blocks(trace, size)):
        for side in ("AB" if k % 2 == 0 else "BA"):
            time.sleep(BLOCK_PAUSE_S)
            runs[side].append(replay(block, sides[side]))
    return _summary(runs)


def warm_up(cfg: ServingConfig, server: srv.Server, model: str) -> None:
    trace = make_trace(cfg.workload(requests=4, rate=100.0, alpha=1.0, adapters=1, seed=99))
    replay(trace, lambda r: (server.url, model))


def overhead(cfg: ServingConfig, weave: srv.Server, adapters: dict, progress) -> dict:
    names = list(adapters)
    loaded, cells, load_s = 0, [], {}
    warm_up(cfg, weave, weave.model)
    sides = {"A": lambda r: (weave.url, names[r.adapter]), "B": lambda r: (weave.url, weave.model)}
    for n in cfg.adapter_counts:
        while loaded < n:
            start = time.perf_counter()
            srv.post(weave, "/v1/load_esft_adapter", {"adapter_name": names[loaded],
                                                      "adapter_path": str(adapters[names[loaded]])})
            load_s[names[loaded]] = time.perf_counter() - start
            loaded += 1
        for alpha in cfg.alphas:
            traces = [make_trace(cfg.workload(cfg.requests, cfg.rate, alpha, n, seed=1000 * n + int(alpha * 100) + t))
                      for t in range(cfg.traces)]
            cell = _interleaved(traces, sides, cfg.block)
            cell.update(adapters=n, alpha=alpha, pairs=len(cell["runs"]["A"]),
                        requests_per_adapter=_histogram([r for trace in traces for r in trace], n))
            cells.append(cell)
            tpot = cell["intervals"]["mean_tpot_ms"]
            progress(f"overhead: {n} adapters, alpha {alpha}: TPOT x{tpot['value']:.3f} [{tpot['low']:.3f}, "
                     f"{tpot['high']:.3f}] over {cell['pairs']} block pairs, TTFT x{cell['ratio']['mean_ttft_ms']:.3f}")
    return {"cells": cells, "hot_load_s": load_s, "one_server": True}


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
