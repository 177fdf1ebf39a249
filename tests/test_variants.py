"""Adapters that tune non-expert modules ("non_expert_modules": true): the format, the merged-model oracle,
and the engines that cannot switch non-expert weights between steps refusing them in one line."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from catalogue_variants import adapter_to_extend
from expertweave_ascend.adapters import EsftAdapter, validate_adapter
from expertweave_ascend.adapters.merge import write_merged_checkpoint
from expertweave_ascend.errors import AdapterError, ExpertWeaveError
from expertweave_ascend.verify import verify_hf

# Tensors every token reads whether or not attention contributes (the decisive tiny model zeroes o_proj),
# and attention's own, whose switch exercises MLA's absorbed matrices.
TUNED = ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.0.mlp.down_proj.weight", "model.layers.2.post_attention_layernorm.weight",
         "model.layers.1.self_attn.kv_b_proj.weight", "model.layers.3.self_attn.q_proj.weight", "model.norm.weight")


def with_non_expert(tiny: Path, like: str | None, out: Path, names=TUNED, seed: int = 0, scale: float = 0.5) -> Path:
    """Adapter `like` (None: one tuning no expert) that also tunes these base tensors: each moved by
    `scale` times its own spread."""
    tensors, cfg = adapter_to_extend(tiny, like, out)
    noise = torch.Generator().manual_seed(seed)
    with safe_open(tiny / "base" / "model.safetensors", framework="pt") as base:
        for key in names:
            w = base.get_tensor(key).float()
            spread = w.std() if w.numel() > 1 and w.std() > 0 else w.abs().mean()
            tensors[key] = (w + scale * spread * torch.randn(w.shape, generator=noise)).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "expert_cfg.json").write_text(json.dumps({**cfg, "shared_experts": False, "non_expert_modules": True}))
    return out


def test_non_expert_tensors_are_read_hashed_and_merged(tiny, geometry, tmp_path):
    path = with_non_expert(tiny, "law", tmp_path / "law-ne")
    adapter = validate_adapter(path, geometry)
    assert adapter.non_expert_keys == tuple(sorted(TUNED))
    plain = EsftAdapter.open(tiny / "adapters" / "law")
    with adapter.reading() as read:
        tuned = read.non_expert()
        for layer, ids in adapter.experts.items():
            for e in ids:
                read(layer, e)
        identity = read.sha256()
    with plain.reading() as read:
        for layer, ids in plain.experts.items():
            for e in ids:
                read(layer, e)
        assert read.sha256() != identity
    merged = write_merged_checkpoint(tiny / "base", adapter, tmp_path / "merged")
    with safe_open(merged / "model.safetensors", framework="pt") as f:
        for key, value in tuned.items():
            assert torch.equal(f.get_tensor(key), value)
        assert torch.equal(f.get_tensor("model.layers.1.self_attn.o_proj.weight"),
                           load_file(tiny / "base" / "model.safetensors")["model.layers.1.self_attn.o_proj.weight"])


@pytest.mark.parametrize("change,phrase", [
    ("unknown", "tensor model.layers.9.self_attn.q_proj.weight is not a tensor of the base model"),
    ("shape", "tensor model.norm.weight has shape [64], the base's has [128]"),
    ("dtype", "tensor model.norm.weight has dtype F32, the base's is BF16"),
])
def test_bad_non_expert_tensors_are_one_clear_error(tiny, geometry, tmp_path, change, phrase):
    path = with_non_expert(tiny, "law", tmp_path / "law-ne", names=("model.norm.weight",))
    tensors = load_file(path / "model.safetensors")
    if change == "unknown":
        tensors["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    elif change == "shape":
        tensors["model.norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    else:
        tensors["model.norm.weight"] = torch.ones(128)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(AdapterError) as info:
        validate_adapter(path, geometry)
    assert info.value.file == str(path / "model.safetensors")
    assert info.value.problem == phrase


def test_the_flag_needs_non_expert_tensors_and_the_tensors_need_the_flag(tiny, geometry, tmp_path):
    path = with_non_expert(tiny, "law", tmp_path / "law-ne", names=())
    with pytest.raises(AdapterError, match='"non_expert_modules" is true but the adapter holds no non-expert tensor'):
        validate_adapter(path, geometry)
    path = with_non_expert(tiny, "law", tmp_path / "law-ne2", names=("model.norm.weight",))
    cfg = json.loads((path / "expert_cfg.json").read_text())
    (path / "expert_cfg.json").write_text(json.dumps({**cfg, "non_expert_modules": False}))
    with pytest.raises(AdapterError, match='model.norm.weight is not a routed- or shared-expert weight, and '
                                           'expert_cfg.json says "non_expert_modules": false'):
        validate_adapter(path, geometry)


def test_inspect_lists_the_tuned_shared_experts_and_non_expert_tensors(tiny, tmp_path, capsys):
    from expertweave_ascend.cli import main
    from test_shared_experts import with_shared_experts

    path = with_non_expert(tiny, None, tmp_path / "ne", names=("model.norm.weight",))
    both = with_shared_experts(tiny, None, tmp_path / "both", (2,))
    tensors = load_file(both / "model.safetensors")
    tensors.update(load_file(path / "model.safetensors"))
    save_file(tensors, both / "model.safetensors")
    (both / "expert_cfg.json").write_text(json.dumps({"experts": {}, "shared_experts": True,
                                                      "non_expert_modules": True}))
    assert main(["adapter", "inspect", str(both), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shared_expert_layers"] == [2] and info["non_expert_tensors"] == ["model.norm.weight"]
    assert main(["adapter", "inspect", str(both)]) == 0
    text = capsys.readouterr().out
    assert "shared experts tuned in layers [2]" in text and "1 non-expert tensors: model.norm.weight" in text


def test_the_transformers_engine_refuses_them_naming_the_flag(tiny, tmp_path):
    path = with_non_expert(tiny, "law", tmp_path / "law-ne")
    with pytest.raises(ExpertWeaveError) as info:
        verify_hf(tiny / "base", {"law-ne": path}, max_new_tokens=2, granularity=64 << 10)
    assert str(info.value).startswith(f'{path / "expert_cfg.json"}: "non_expert_modules" is true: this engine runs '
                                      "every request with the base's non-expert weights")
