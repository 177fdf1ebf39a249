"""More adapters than device rows: 100 catalogued adapters, room for 8, S-LoRA popularity, over HTTP.

Three servers of the bench model, one after another, each replaying the same traces (Poisson arrivals,
S-LoRA adapter popularity over 100 adapters, alpha 1 = uniform and 0.3 = skewed; random prompts):
  all_resident  every adapter loaded at start (`--adapters-dir`, --max-adapters 100): no load ever waits;
  lru           `--adapter-root`, --max-adapters 8, no host tier: each miss reads the adapter's files;
  full          as lru with a host tier (1 GiB) filled from the catalogue at start (--warm-host-tier),
                prefetch of waiting adapters and the demand eviction policy.
Each request streams; the client records its TTFT, its latency and the response's x-expertweave-adapter
(hit or miss) and x-expertweave-load-wait-ms headers. Reported per server and alpha: hit rate, the share
of all request time spent waiting for loads, TTFT p50/p99 of hits and of misses, output throughput and
its ratio to all_resident, and the server's load, hidden-load and eviction counts (/metrics).
"""

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from . import servers as srv
from .workload import WorkloadConfig, make_trace

VARIANTS = {
    "all_resident": lambda root: ["--adapters-dir", str(root), "--max-adapters", "100"],
    "lru": lambda root: ["--adapter-root", str(root), "--max-adapters", "8", "--host-adapter-bytes", "0",
                         "--eviction-policy", "lru"],
    "full": lambda root: ["--adapter-root", str(root), "--max-adapters", "8", "--host-adapter-bytes", "1GiB",
                          "--warm-host-tier", "--eviction-policy", "demand"],
}


@dataclass(frozen=True)
class TieringConfig:
    requests: int
    rate: float
    alphas: tuple[float, ...] = (1.0, 0.3)
    variants: tuple[str, ...] = tuple(VARIANTS)  # all_resident first: the others' throughput is relative to it
    adapters: int = 100
    warm_up: int = 16
    prompt_len: int = 32
    output_len: int = 16
    vocab_size: int = 0  # the served model's

    def workload(self, requests: int, alpha: float, seed: int) -> WorkloadConfig:
        return WorkloadConfig(requests, self.rate, alpha, self.adapters, self.vocab_size, self.prompt_len,
                              self.output_len, seed)


async def _send(session, url: str, model: str, request, start: float) -> dict:
    await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
    body = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0,
            "ignore_eos": True, "stream": True}
    sent = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            return {"ok": False, "status": response.status, "text": (await response.text())[:300]}
        ttft, chunks = None, 0
        async for line in response.content:
            if line.startswith(b"data: {"):
                chunks += 1
                ttft = time.perf_counter() - sent if ttft is None else ttft
        done = time.perf_counter()
        return {"ok": True, "ttft_s": ttft, "latency_s": done - sent, "done": done, "sent": sent, "tokens": chunks,
                "hit": response.headers.get("x-expertweave-adapter", "hit") == "hit",
                "wait_s": float(response.headers.get("x-expertweave-load-wait-ms", 0.0)) / 1e3}


async def _replay(url: str, names: list[str], trace) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=3600)) as session:
        start = time.perf_counter()
        return await asyncio.gather(*(_send(session, url, names[r.adapter], r, start) for r in trace))


def _percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def summarize(results: list[dict]) -> dict:
    failed = [r for r in results if not r["ok"]]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(results)} requests failed; first: {failed[0]}")
    hits = [r for r in results if r["hit"]]
    misses = [r for r in results if not r["hit"]]
    span = max(r["done"] for r in results) - min(r["sent"] for r in results)
    total_latency = sum(r["latency_s"] for r in results)
    ms = lambda v: None if v is None else v * 1e3  # noqa: E731
    return {
        "requests": len(results), "hit_rate": len(hits) / len(results),
        "load_wait_share": sum(r["wait_s"] for r in results) / total_latency,
        "mean_wait_ms_of_misses": ms(statistics.fmean(r["wait_s"] for r in misses)) if misses else None,
        "ttft_p50_ms_hits": ms(_percentile([r["ttft_s"] for r in hits], 50)),
        "ttft_p99_ms_hits": ms(_percentile([r["ttft_s"] for r in hits], 99)),
        "ttft_p50_ms_misses": ms(_percentile([r["ttft_s"] for r in misses], 50)),
        "ttft_p99_ms_misses": ms(_percentile([r["ttft_s"] for r in misses], 99)),
        "output_throughput": sum(r["tokens"] for r in results) / span,
        "duration_s": span,
    }


def _counters(server: srv.Server) -> dict[str, float]:
    """The server's on-demand loads by where the packed adapter came from, and its evictions, so far."""
    import requests

    out = {"loads_disk": 0.0, "loads_host": 0.0, "loads_prefetch": 0.0, "evictions": 0.0}
    for line in requests.get(f"{server.url}/metrics", timeout=60).text.splitlines():
        value = line.rsplit(" ", 1)[-1]
        if line.startswith("expertweave_adapter_loads_by_source_total{"):
            out["loads_" + line.split('source="')[1].split('"')[0]] += float(value)
        elif line.startswith("expertweave_adapter_evictions_total{"):
            out["evictions"] += float(value)
    return out


def measure(cfg: TieringConfig, base: Path, adapters: dict[str, Path], engine_args: list[str], log_dir: Path,
            progress) -> dict:
    root = next(iter(adapters.values())).parent
    names = list(adapters)[:cfg.adapters]
    variants = {}
    for variant in cfg.variants:
        server = srv.start_expertweave(f"tiering-{variant}", base, 8, engine_args, log_dir,
                                       serve_args=tuple(VARIANTS[variant](root)))
        try:
            progress(f"tiering: starting the {variant} server (log {server.log})")
            srv.wait_ready([server])
            cells = {}
            for alpha in cfg.alphas:
                warm = make_trace(cfg.workload(cfg.warm_up, alpha, seed=500 + int(alpha * 100)))
                asyncio.run(_replay(server.url, names, warm))
                before = _counters(server)
                trace = make_trace(cfg.workload(cfg.requests, alpha, seed=int(alpha * 100)))
                cell = summarize(asyncio.run(_replay(server.url, names, trace)))
                after = _counters(server)
                cell["server"] = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
                cells[str(alpha)] = cell
                progress(f"tiering: {variant}, alpha {alpha}: hit rate {cell['hit_rate']:.2f}, load-wait share "
                         f"{cell['load_wait_share']:.3%}, throughput {cell['output_throughput']:.1f} tok/s")
            variants[variant] = cells
        finally:
            srv.stop([server])
    for variant, cells in variants.items():
        for alpha, cell in cells.items():
            cell["throughput_vs_all_resident"] = \
                cell["output_throughput"] / variants["all_resident"][alpha]["output_throughput"]
    return {"config": {"requests": cfg.requests, "rate": cfg.rate, "alphas": list(cfg.alphas),
                       "adapters": cfg.adapters, "room": 8, "prompt_len": cfg.prompt_len,
                       "output_len": cfg.output_len, "warm_up": cfg.warm_up},
            "variants": variants}
