"""`make bench` / `make bench-quick`: every benchmark of perf/ in one run, on this machine.

    .venv/bin/python -m perf.run [--quick] [--only memory,reroute,...] [--out perf/results]

Writes perf/results/<date>-<machine>[-quick][-<only>].{json,md} and <same>-<plot>.png (perf/report.py).
Sections: memory (DeepSeek-V2-Lite shapes, real ESFT geometries, KV capacity on a 64 GB device),
decode (the decode-step cost of 1..20 adapters against the base, same-engine and cross-engine A/B with
intervals, and that cost split into its parts),
reroute (share of a CPU MoE layer at DeepSeek-V2-Lite shapes), hotload (adapter load vs copy bandwidth),
serving (one ExpertWeave server with 20 adapters: the same trace as adapter and as base requests, interleaved
block by block; merged engines vs ExpertWeave; over HTTP),
tiering (100 catalogued adapters with room for 8: all resident vs on-demand LRU vs the full policy),
consolidation (near-duplicate experts served by one copy: bytes saved vs divergence, per threshold),
reconfiguration (adapters tuning non-expert modules: one ExpertWeave engine vs one engine per merged model),
contrastive (contrastive decoding against the base vs plain adapter decoding: per-token cost, KV blocks).
--quick: every target's figure in under 10 minutes on 2 cores, with wider intervals: eager engines (no
torch.compile); decode on one engine build, 12 rounds, 20 adapters only, no merged-model engine; serving one
trace per popularity (12 block pairs), no merged engines; tiering alpha 1, all resident vs the full policy;
four consolidation thresholds; fewer token counts, layers and rounds elsewhere. The full run is the reference.
Check for stale vLLM processes first (`ps aux | grep -i vllm`): they busy-poll.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import bench_decode, consolidation, contrastive, hotload, memory, reconfiguration, report, reroute_share, serving, tiering
from . import servers as srv
from .bench_model import BUILT, build, cache_dir, merged
from .serving import ServingConfig
from .tiering import TieringConfig

KV_CACHE_BYTES = 256 << 20  # per engine side: ExpertWeave and base-only each; merged engines split it


@dataclass(frozen=True)
class Settings:
    reroute_tokens: tuple[int, ...]
    reroute_min_run_s: float
    hotload_layers: tuple[int, ...]
    hotload_repeats: int
    serving: ServingConfig
    tiering: TieringConfig
    contrastive_rounds: int
    decode_rounds: int
    decode_instances: int
    decode_adapter_counts: tuple[int, ...]
    decode_merged_engine: bool
    decode_split_rounds: int
    serving_merged: bool  # the merged engines' servers beside ExpertWeave's
    consolidation_thresholds: tuple[float, ...]
    eager: bool


FULL = Settings(reroute_tokens=(1, 2, 4, 8, 16, 32, 64, 128, 256), reroute_min_run_s=1.0,
                hotload_layers=tuple(range(1, 27)), hotload_repeats=5,
                serving=ServingConfig(requests=48, rate=3.0, traces=3, order="ABBAABBA", merged_adapters=3),
                tiering=TieringConfig(requests=240, rate=2.0), contrastive_rounds=12, decode_rounds=84,
                decode_instances=6, decode_adapter_counts=bench_decode.ADAPTER_COUNTS, decode_merged_engine=True,
                decode_split_rounds=bench_decode.SPLIT_ROUNDS, serving_merged=True,
                consolidation_thresholds=consolidation.THRESHOLDS, eager=False)
QUICK = Settings(reroute_tokens=(1, 4, 16, 64, 256), reroute_min_run_s=0.2,
                 hotload_layers=tuple(range(1, 7)), hotload_repeats=3,
                 serving=ServingConfig(requests=32, rate=3.0, traces=1, order="AB", merged_adapters=2),
                 tiering=TieringConfig(requests=40, rate=2.0, alphas=(1.0,), variants=("all_resident", "full"), warm_up=8), contrastive_rounds=3, decode_rounds=12,
                 decode_instances=1, decode_adapter_counts=(20,), decode_merged_engine=False,
                 decode_split_rounds=2, serving_merged=False, consolidation_thresholds=(0.0, 0.02, 0.2, 10.0), eager=True)


def machine() -> dict:
    import torch
    import vllm

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    return {"tag": f"{platform.machine()}-{os.cpu_count()}cpu", "cpu": cpu, "cpus": os.cpu_count(),
            "memory_bytes": mem, "python": platform.python_version(), "torch": torch.__version__,
            "vllm": vllm.__version__, "isa": torch.backends.cpu.get_cpu_capability()}


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_memory(settings: Settings) -> dict:
    progress("memory: real ESFT geometries on DeepSeek-V2-Lite shapes")
    return memory.measure()


def run_decode(settings: Settings) -> dict:
    engines = "base-only, merged and ExpertWeave" if settings.decode_merged_engine else "base-only and ExpertWeave"
    progress(f"decode: {engines} engines, each arm in lockstep with base-only")
    return bench_decode.measure(settings.decode_rounds, settings.eager, progress, settings.decode_instances,
                                settings.decode_adapter_counts, settings.decode_merged_engine,
                                settings.decode_split_rounds)


def run_reroute(settings: Settings) -> dict:
    progress("reroute: share of one CPU MoE layer")
    return reroute_share.measure(list(settings.reroute_tokens), settings.reroute_min_run_s)


def run_hotload(settings: Settings) -> dict:
    progress("hotload: adapter load vs memory-copy bandwidth")
    return hotload.measure(settings.hotload_layers, settings.hotload_repeats)


def _serving(settings: Settings, log_dir: Path) -> dict:
    base, adapters = build()
    cfg = replace(settings.serving, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"])
    args = lambda kv: srv.engine_args(kv, settings.eager)  # noqa: E731
    servers = [srv.start_expertweave("expertweave", base, max(cfg.adapter_counts), args(KV_CACHE_BYTES), log_dir)]
    if settings.serving_merged:
        merged_models = merged(base, {n: adapters[n] for n in list(adapters)[:cfg.merged_adapters]})
        servers += [srv.start_vllm(name, path, args(KV_CACHE_BYTES // len(merged_models)), log_dir)
                    for name, path in merged_models.items()]
    try:
        progress(f"starting {len(servers)} vLLM server{'s' * (len(servers) > 1)} (logs in {log_dir})")
        srv.wait_ready(servers)
        weave, *merged_servers = servers
        result = {"config": asdict(cfg), "kv_cache_bytes": KV_CACHE_BYTES, "eager": settings.eager,
                  "overhead": serving.overhead(cfg, weave, adapters, progress)}
        if merged_servers:
            result["merged"] = serving.merged(cfg, weave, {s.label: s for s in merged_servers}, progress)
        return result
    finally:
        srv.stop(servers)


def run_serving(settings: Settings) -> dict:
    progress("serving: building the bench model and 20 adapters")
    with tempfile.TemporaryDirectory(prefix="expertweave-bench-logs-") as logs:
        return _serving(settings, Path(logs))


def run_tiering(settings: Settings) -> dict:
    progress(f"tiering: {BUILT} adapters with room for 8")
    base, adapters = build(BUILT)
    cfg = replace(settings.tiering, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="expertweave-bench-logs-") as logs:
        return tiering.measure(cfg, base, adapters, srv.engine_args(KV_CACHE_BYTES, settings.eager), Path(logs),
                               progress)


def run_consolidation(settings: Settings) -> dict:
    return consolidation.measure(settings.consolidation_thresholds, progress=progress)


def run_reconfiguration(settings: Settings) -> dict:
    progress(f"reconfiguration: {reconfiguration.VARIANTS} variants tuning non-expert modules")
    base, adapters = build()
    cfg = replace(settings.serving, vocab_size=json.loads((base / "config.json").read_text())["vocab_size"])
    with tempfile.TemporaryDirectory(prefix="expertweave-bench-logs-") as logs:
        return reconfiguration.measure(cfg, base, adapters, cache_dir() / "variants", KV_CACHE_BYTES, settings.eager,
                                       Path(logs), progress)


def run_contrastive(settings: Settings) -> dict:
    progress(f"contrastive: {contrastive.ADAPTERS} adapters, plain vs contrastive decoding")
    return contrastive.measure(settings.contrastive_rounds, eager=settings.eager, kv_cache_bytes=KV_CACHE_BYTES,
                               progress=progress)


RUNNERS = {"memory": run_memory, "decode": run_decode, "reroute": run_reroute, "hotload": run_hotload,
           "serving": run_serving, "tiering": run_tiering, "consolidation": run_consolidation,
           "reconfiguration": run_reconfiguration, "contrastive": run_contrastive}


SECTIONS = tuple(RUNNERS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the under-10-minute variant")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--adapter-counts", help="serving: comma-separated adapter counts instead of 20")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    only = args.only.split(",") if args.only else list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = QUICK if args.quick else FULL
    if args.adapter_counts:
        counts = tuple(int(n) for n in args.adapter_counts.split(","))
        settings = replace(settings, serving=replace(settings.serving, adapter_counts=counts))
    info = machine()
    stem = f"{datetime.date.today().isoformat()}-{info['tag']}{'-quick' if args.quick else ''}"
    if args.only:  # a partial run never overwrites the full run's results
        stem += "-" + "-".join(s for s in SECTIONS if s in only)
    if args.adapter_counts:
        stem += "-adapters-" + "-".join(str(n) for n in settings.serving.adapter_counts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "make bench-quick" if args.quick else "make bench"
    if args.only:
        command += f" ONLY={','.join(s for s in SECTIONS if s in only)}"
    if args.adapter_counts:
        command = f"python -m perf.run{' --quick' if args.quick else ''} --only {','.join(s for s in SECTIONS if s in only)} " \
                  f"--adapter-counts {args.adapter_counts}"
    results = {"command": command, "date": datetime.date.today().isoformat(), "machine": info,
               "settings": asdict(settings), "sections": {}}
    started = time.perf_counter()
    results["section_s"] = {}
    for section in (s for s in SECTIONS if s in only):
        begun = time.perf_counter()
        results["sections"][section] = RUNNERS[section](settings)
        results["section_s"][section] = time.perf_counter() - begun
        progress(f"{section}: {results['section_s'][section] / 60:.1f} min")
    results["elapsed_s"] = time.perf_counter() - started
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    written = report.write(json_path)
    progress(f"done in {results['elapsed_s'] / 60:.1f} min: {json_path}, " + ", ".join(str(p) for p in written))
    print((out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
