"""Recovers the ESFT adapter of a fully fine-tuned checkpoint by diffing it against its base."""

from pathlib import Path

import torch
from tqdm import tqdm

from ..errors import AdapterError
from ..files import read_json
from ..geometry import BaseGeometry
from .checkpoint import EXPERT_KEY, PROJS, TORCH_DTYPES, Checkpoint
from .esft import save_adapter


def _canonical(key: str) -> str:
    return key if key.startswith("model.") or key.startswith("lm_head.") else f"model.{key}"


def extract_adapter(base_dir: str | Path, finetuned_dir: str | Path, out: str | Path,
                    atol: float = 0.0, progress: bool | None = None,
                    name: str | None = None) -> dict[int, list[int]]:
    """Writes the adapter of the routed experts that differ by more than atol; returns them per layer.

    Refuses when anything outside the routed experts differs: such a model is not an ESFT adapter.
    Tuned experts are written in the base's dtype, the dtype they will be served in. The progress bar
    shows on a terminal only (progress=None), so scripted runs print nothing but the result or error.
    """
    base_dir, finetuned_dir = Path(base_dir), Path(finetuned_dir)
    geometry = BaseGeometry.from_checkpoint(base_dir)
    base, tuned = Checkpoint.open(base_dir), Checkpoint.open(finetuned_dir)
    base_keys = {_canonical(k): k for k in base.tensors}
    tuned_keys = {_canonical(k): k for k in tuned.tensors}
    missing = sorted(set(base_keys) - set(tuned_keys))
    extra = sorted(set(tuned_keys) - set(base_keys))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the base does not"
        raise AdapterError(finetuned_dir, f"tensor names differ from the base: it {what}")
    changed: dict[int, set[int]] = {}
    with base.reading() as read_base, tuned.reading() as read_tuned:
        for canon in tqdm(sorted(base_keys), desc="comparing", unit="tensor",
                          disable=None if progress is None else not progress):
            a, b = read_base(base_keys[canon]), read_tuned(tuned_keys[canon])
            tuned_file = tuned.tensors[tuned_keys[canon]].file
            if a.shape != b.shape:
                raise AdapterError(tuned_file, f"tensor {canon} has shape {list(b.shape)}, the base has {list(a.shape)}")
            diff = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
            if diff <= atol:
                continue
            m = EXPERT_KEY.match(canon)
            if not m:
                raise AdapterError(tuned_file, f"non-expert tensor {canon} differs from the base (max |diff| "
                                   f"{diff:.3g}): not an ESFT fine-tune of routed experts")
            changed.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not changed:
        raise AdapterError(finetuned_dir, f"no routed expert differs from the base (atol {atol})")
    experts: dict[int, dict[int, tuple[torch.Tensor, ...]]] = {}
    with tuned.reading() as read_tuned:
        for layer, ids in changed.items():
            experts[layer] = {}
            for expert in sorted(ids):
                names = [f"model.layers.{layer}.mlp.experts.{expert}.{p}.weight" for p in PROJS]
                experts[layer][expert] = tuple(
                    read_tuned(tuned_keys[n]).to(TORCH_DTYPES[base.dtype(base_keys[n])]) for n in names)
    config = read_json(finetuned_dir / "config.json") if (finetuned_dir / "config.json").exists() else None
    save_adapter(out, experts, config=config, listed_layers=list(geometry.moe_layers), name=name)
    return {layer: sorted(ids) for layer, ids in sorted(changed.items())}
