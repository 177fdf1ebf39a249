"""Partial runtime reconfiguration: adapters that tune non-expert modules served by one ExpertWeave engine
(ExpertWeave's scheduler gives each step one variant's requests; the worker switches the non-expert
weights between steps) against one plain vLLM engine per merged model, the comparison of the QoS
multi-MoE serving paper (arXiv 2505.06481): turnaround (end-to-end latency) and TTFT on the same trace.

The variants are bench-model adapters that also tune every non-expert tensor of the base (attention,
norms, the dense layer, embeddings, head), each moved by a fifth of its own spread: the most a
`non_expert_modules` adapter can change, so the most a switch costs.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.adapters.checkpoint import EXPERT_KEY, SHARED_KEY
from expertweave_ascend.adapters.merge import write_merged_checkpoint

from . import servers as srv
from .serving import ServingConfig, _cell, _histogram, warm_up
from .workload import make_trace

VARIANTS = 3


def non_expert_variant(base: Path, adapter: Path, out: Path, seed: int) -> Path:
    """The adapter, also tuning every non-expert tensor of the base (built once into out)."""
    if (out / "variant.ok").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, out)
    tensors = load_file(out / "model.safetensors")
    noise = torch.Generator().manual_seed(seed)
    with safe_open(base / "model.safetensors", framework="pt") as f:
        for key in f.keys():
            if EXPERT_KEY.match(key) or SHARED_KEY.match(key):
                continue
            w = f.get_tensor(key)
            spread = float(w.float().std()) if w.numel() > 1 else 0.0
            spread = spread or float(w.float().abs().mean())
            tensors[key] = (w.float() + 0.2 * spread * torch.randn(w.shape, generator=noise)).to(w.dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "expert_cfg.json").read_text())
    (out / "expert_cfg.json").write_text(json.dumps({**cfg, "non_expert_modules": True}))
    (out / "variant.ok").touch()
    return out


def measure(cfg: ServingConfig, base: Path, adapters: dict[str, Path], cache: Path, kv_cache_bytes: int,
            eager: bool, log_dir: Path, progress) -> dict:
    variants = {f"{name}-ne": non_expert_variant(base, path, cache / f"{name}-ne", seed=k)
                for k, (name, path) in enumerate(list(adapters.items())[:VARIANTS])}
    merged = {}
    for name, path in variants.items():
        target = cache / "merged" / name
        if not (target / "merged.ok").exists():
            write_merged_checkpoint(base, EsftAdapter.open(path), target)
            (target / "merged.ok").touch()
        merged[name] = target
    serve_args = tuple(f"--adapter={name}={path}" for name, path in variants.items())
    servers = [srv.start_expertweave("expertweave-variants", base, VARIANTS, srv.engine_args(kv_cache_bytes, eager),
                                     log_dir, serve_args)]
    servers += [srv.start_vllm(name, path, srv.engine_args(kv_cache_bytes // VARIANTS, eager), log_dir)
                for name, path in merged.items()]
    try:
        progress(f"reconfiguration: starting {len(servers)} vLLM servers (logs in {log_dir})")
        srv.wait_ready(servers)
        weave, *others = servers
        names = list(variants)
        for server in others:
            warm_up(cfg, server, server.model)
        for name in names:
            warm_up(cfg, weave, name)
        trace = make_trace(cfg.workload(cfg.requests, cfg.rate, 1.0, len(names), seed=11))
        by_name = {s.label: s for s in others}
        sides = {"A": lambda r: (weave.url, names[r.adapter]),
                 "B": lambda r: (by_name[names[r.adapter]].url, by_name[names[r.adapter]].model)}
        cell = _cell(trace, sides, cfg.order)
        metrics = srv.metrics(weave)
        cell.update(variants=len(names), requests_per_variant=_histogram(trace, len(names)),
                    non_expert_bytes={n: a["non_expert_bytes"] for n, a in
                                      srv.get(weave, "/v1/esft_adapters")["memory"]["adapters"].items()},
                    switches=metrics["expertweave_variant_switches_total"],
                    switch_s=metrics["expertweave_variant_switch_seconds_total"])
        progress(f"reconfiguration: ExpertWeave / {len(names)} merged engines: turnaround "
                 f"x{cell['ratio']['mean_e2el_ms']:.3f}, TTFT x{cell['ratio']['mean_ttft_ms']:.3f}")
        return cell
    finally:
        srv.stop(servers)
