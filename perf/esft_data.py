"""The real ESFT data of DeepSeek-V2-Lite (../shared/data/esft): adapter geometries and router traces.

Three real expert selections exist (law, intent, summary). Sets of more adapters rotate them over the
26 MoE layers (adapter k takes task k % 3 with its layers shifted by 7 * (k // 3)), so every adapter keeps
a real per-layer count distribution while the sets differ layer by layer, as distinct fine-tunes do.
"""

import os
from pathlib import Path

import torch

from expertweave_ascend.adapters import read_expert_cfg

# The real ESFT data: ../shared/data/esft beside the checkout, or EXPERTWEAVE_ESFT_DATA (a GPU machine).
ESFT_DATA = Path(os.environ.get("EXPERTWEAVE_ESFT_DATA") or
                 Path(__file__).resolve().parents[1].parent / "shared" / "data" / "esft")
TASKS = ("law", "intent", "summary")
MOE_LAYERS = tuple(range(1, 27))  # DeepSeek-V2-Lite: layer 0 is dense
TOP_K = 6


def require_data() -> Path:
    if not (ESFT_DATA / "expert_configs").is_dir():
        raise SystemExit(f"error: {ESFT_DATA}: the real ESFT data is missing (a checkout of shared/ beside this one)")
    return ESFT_DATA


def real_selections() -> dict[str, dict[int, tuple[int, ...]]]:
    return {task: read_expert_cfg(require_data() / "expert_configs" / f"{task}.json") for task in TASKS}


def adapter_geometries(n: int, layers: tuple[int, ...] = MOE_LAYERS) -> dict[str, dict[int, tuple[int, ...]]]:
    """n adapter selections {name: {layer: expert ids}} over the given MoE layers (see module doc)."""
    real = real_selections()
    out = {}
    for k in range(n):
        task = TASKS[k % len(TASKS)]
        shift = 7 * (k // len(TASKS))
        name = task if k < len(TASKS) else f"{task}-r{shift}"
        out[name] = {layer: real[task].get(MOE_LAYERS[(i + shift) % len(MOE_LAYERS)], ())
                     for i, layer in enumerate(layers)}
    return out


def router_trace(task: str, layer: int) -> torch.Tensor:
    """Real top-6 expert ids of DeepSeek-V2-Lite on the task's data at one MoE layer: [8222, 6] int32."""
    path = require_data() / "expert_scores" / task / f"expert_weights_{layer}.txt"
    ids = []
    for line in path.read_text().splitlines():
        ids.extend(int(x) for x in line.split("\t\t", 1)[0].split("\t"))
    return torch.tensor(ids, dtype=torch.int32).view(-1, TOP_K)
