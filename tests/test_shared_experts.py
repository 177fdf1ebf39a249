"""Adapters that tune shared experts ("shared_experts": true), over the transformers reference
integration: served per token in the same batch as the base and routed-only adapters, each row equal to
its merged model; installed and removed with the adapter's row."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from catalogue_variants import adapter_to_extend
from expertweave_ascend.adapters import EsftAdapter, validate_adapter
from expertweave_ascend.errors import AdapterError
from expertweave_ascend.integrations.hf import load_model, moe_layer_handles
from expertweave_ascend.verify import verify_hf
from expertweave_ascend.weave import ExpertWeave, WeaveConfig

PROJS = ("gate_proj", "up_proj", "down_proj")


def with_shared_experts(tiny: Path, like: str | None, out: Path, layers: tuple[int, ...], seed: int = 0) -> Path:
    """Adapter `like` (None: one tuning no routed expert) that also tunes these layers' shared experts:
    each weight moved by several times its own scale, as make-tiny tunes routed experts."""
    tensors, cfg = adapter_to_extend(tiny, like, out)
    noise = torch.Generator().manual_seed(seed)
    with safe_open(tiny / "base" / "model.safetensors", framework="pt") as base:
        for layer in layers:
            for proj in PROJS:
                key = f"model.layers.{layer}.mlp.shared_experts.{proj}.weight"
                w = base.get_tensor(key).float()
                tensors[key] = (w + 4 * w.std() * torch.randn(w.shape, generator=noise)).to(torch.bfloat16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "expert_cfg.json").write_text(json.dumps({**cfg, "shared_experts": True, "non_expert_modules": False}))
    return out


def test_a_mixed_batch_with_shared_expert_adapters_equals_the_merged_models(tiny, tmp_path):
    adapters = {"law": tiny / "adapters" / "law",
                "law-shared": with_shared_experts(tiny, "law", tmp_path / "law-shared", (1, 3)),
                "shared-only": with_shared_experts(tiny, None, tmp_path / "shared-only", (1, 2, 3), seed=1),
                "code": tiny / "adapters" / "code"}
    report = verify_hf(tiny / "base", adapters, max_new_tokens=8, granularity=64 << 10)
    assert report.ok, {name: (row.tokens_equal, row.max_abs_diff) for name, row in report.adapters.items()}
    assert all(row.max_abs_diff < 1e-4 for row in report.adapters.values())
    assert report.adapters["shared-only"].differs_from_base, "the tuned shared experts change the outputs"
    m = report.memory
    layer_bytes = 3 * 128 * 64 * 4  # one shared expert of the tiny model, float32
    assert m.adapters["law-shared"].shared_expert_bytes == 2 * layer_bytes
    assert m.adapters["shared-only"].shared_expert_bytes == 3 * layer_bytes
    assert m.adapters["shared-only"].experts == 0 and m.adapters["law"].shared_expert_bytes == 0
    assert m.shared_expert_bytes == 5 * layer_bytes


def test_shared_experts_come_and_go_with_the_row(tiny, geometry, tmp_path):
    handles, rows = moe_layer_handles(load_model(tiny / "base"))
    weave = ExpertWeave(geometry, handles, WeaveConfig(granularity=64 << 10, adapter_slots=32))
    try:
        path = with_shared_experts(tiny, "math", tmp_path / "math-shared", (2,))
        pending = weave.prepare("math-shared", weave.pack(path))
        assert not weave.shared_rows.by_layer, "not served before it is published"
        weave.abandon(pending)
        loaded = weave.load_adapter("math-shared", path)
        assert set(weave.shared_rows.by_layer) == {2} and set(weave.shared_rows.by_layer[2]) == {loaded.row}
        with EsftAdapter.open(path).reading() as read:
            gate, up, down = read.shared(2)
        assert torch.equal(weave.shared_rows.by_layer[2][loaded.row]["down"], down.float())
        weave.load_adapter("law", tiny / "adapters" / "law")
        weave.unload_adapter("math-shared")
        assert not weave.shared_rows.by_layer
    finally:
        weave.close()


def test_a_base_without_shared_experts_refuses_them(tiny, geometry, tmp_path):
    path = with_shared_experts(tiny, "law", tmp_path / "law-shared", (1,))
    bare = dataclasses.replace(geometry, shared_intermediate_size=0)
    with pytest.raises(AdapterError) as info:
        validate_adapter(path, bare)
    assert info.value.file == str(path / "expert_cfg.json")
    assert info.value.problem == '"shared_experts" is true but the base model has no shared experts'
