"""Many distinct adapters for the decisive tiny model, and the tokens their merged models generate."""

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.integrations.hf import merge_adapter

PARENTS = ("law", "math", "code", "intent")


def adapter_to_extend(tiny: Path, like: str | None, out: Path) -> tuple[dict, dict]:
    """(tensors, expert_cfg) of a copy of tiny adapter `like` at out, or of a new adapter tuning no expert
    (None), for a test to add tensors to before writing them back."""
    if like is None:
        out.mkdir(parents=True)
        shutil.copy(tiny / "adapters" / "law" / "config.json", out / "config.json")
        return {}, {"experts": {}}
    shutil.copytree(tiny / "adapters" / like, out)
    return load_file(out / "model.safetensors"), json.loads((out / "expert_cfg.json").read_text())


def write_variants(adapters: Path, out: Path, count: int) -> dict[str, Path]:
    """count adapters named a000, a001, ...: variant k scales every expert of parent k % 4 by its own
    factor, so each has its own bytes (content hash) and its own outputs."""
    out.mkdir(parents=True, exist_ok=True)
    made = {}
    for k in range(count):
        parent = adapters / PARENTS[k % len(PARENTS)]
        target = out / f"a{k:03d}"
        target.mkdir()
        for name in ("expert_cfg.json", "config.json"):
            shutil.copy(parent / name, target / name)
        factor = 1 + 0.02 * (k // len(PARENTS) + 1) * (-1) ** k
        with safe_open(parent / "model.safetensors", framework="pt") as f:
            tensors = {key: (f.get_tensor(key).float() * factor).to(torch.bfloat16) for key in f.keys()}
            metadata = f.metadata()
        save_file(tensors, target / "model.safetensors", metadata=metadata)
        made[target.name] = target
    return made


@torch.no_grad()
def merged_tokens(base_model, adapter: Path | None, prompt: list[int], count: int) -> list[int]:
    """Greedy tokens of the adapter's merged model (the base model for None), from the prompt's ids."""
    model = base_model if adapter is None else merge_adapter(base_model, EsftAdapter.open(adapter))
    ids = torch.tensor([prompt])
    out = []
    for _ in range(count):
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
