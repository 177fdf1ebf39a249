"""Serving trust: what the engine serves of an adapter is copied out of its files at load and its content
hash is the hash of exactly those bytes; the validator refuses what a load refuses, in the same words.

An adapter file edited in place, replaced or truncated after a load changes nothing served. A served
tensor that were still a mapping of a truncated file would kill the process with SIGBUS when read: this
test run crashing is that failure."""

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter, save_adapter, validate_adapter
from expertweave_ascend.adapters.esft import AdapterReader
from expertweave_ascend.cli import main
from expertweave_ascend.errors import AdapterError
from expertweave_ascend.host_tier import HostTier
from expertweave_ascend.loader import BackgroundLoader
from test_shared_experts import with_shared_experts
from test_variants import with_non_expert
from test_weave import assert_unchanged, snapshot

PROJS = ("gate_proj", "up_proj", "down_proj")


def copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def split_non_expert(path: Path) -> Path:
    """Moves the adapter's non-expert tensors to a second file, so that it is read from two."""
    tensors = load_file(path / "model.safetensors")
    experts = {key: t for key, t in tensors.items() if ".mlp.experts." in key}
    save_file(experts, path / "model.safetensors", metadata={"format": "pt"})
    save_file({key: t for key, t in tensors.items() if key not in experts}, path / "non_expert.safetensors",
              metadata={"format": "pt"})
    return path


@pytest.fixture
def adapters(tiny, tmp_path) -> dict[str, Path]:
    """Routed experts only; with tuned shared experts; with tuned non-expert modules (in two files)."""
    return {"experts": copy_adapter(tiny / "adapters" / "law", tmp_path / "experts"),
            "shared": with_shared_experts(tiny, "math", tmp_path / "shared", (1, 3)),
            "non-expert": split_non_expert(with_non_expert(tiny, "code", tmp_path / "non-expert"))}


def file_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of the adapter's files (copies) and its safetensors dtype."""
    tensors, dtypes = {}, {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key).clone()
                dtypes[key] = f.get_slice(key).get_dtype()
    return tensors, dtypes


def content_sha256(cfg: bytes, tensors: dict[str, torch.Tensor], dtypes: dict[str, str]) -> str:
    """An adapter's identity as AdapterReader defines it: expert_cfg.json, then every tensor's name, dtype,
    shape and the sha256 of its bytes, by name."""
    identity = hashlib.sha256(cfg)
    for key in sorted(tensors):
        t = tensors[key]
        digest = hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).digest()
        identity.update(f"\n{key} {dtypes[key]} {list(t.shape)} ".encode() + digest)
    return identity.hexdigest()


def served(weave, loaded, packed) -> dict[str, torch.Tensor]:
    """Every tensor the engine serves of this adapter, cloned: its slots, its shared experts, its non-expert
    tensors, and the host tier's packed copy a later load would copy from."""
    out = {}
    for layer, slots in loaded.slots.items():
        for name, view in weave.memory.views(layer).items():
            out[f"slots {layer} {name}"] = view[slots].clone()
    for layer, rows in weave.shared_rows.by_layer.items():
        for name, t in rows.get(loaded.row, {}).items():
            out[f"shared {layer} {name}"] = t.clone()
    for key, t in loaded.non_expert.items():
        out[f"non-expert {key}"] = t.clone()
    for kind, layers in (("host", packed.weights), ("host shared", packed.shared)):
        for layer, weights in layers.items():
            for name, t in weights.items():
                out[f"{kind} {layer} {name}"] = t.clone()
    for key, t in packed.non_expert.items():
        out[f"host non-expert {key}"] = t.clone()
    return out


@pytest.fixture
def loaded(make_weave, adapters):
    """The three adapters loaded through the host tier as a server's worker loads them: name -> (its
    LoadedAdapter, the tier's packed copy, what it serves, the content hash of its files)."""
    weave = make_weave(non_expert_refusal=None)
    tier = HostTier(1 << 30)
    loader = BackgroundLoader(weave, tier)
    state = {}
    for name, path in adapters.items():
        expected = content_sha256((path / "expert_cfg.json").read_bytes(), *file_tensors(path))
        answer = loader.load_now(name, path)
        assert answer.error is None and answer.source == "disk"
        adapter = weave.adapters[name]
        packed = tier.get(name, path)
        state[name] = (adapter, packed, served(weave, adapter, packed), expected)
    yield weave, tier, state
    loader.close()


def data_start(file: Path) -> int:
    with open(file, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def edit_in_place(file: Path) -> None:
    start = data_start(file)
    with open(file, "r+b") as f:
        f.seek(start)
        f.write(b"\x3f" * (os.path.getsize(file) - start))  # bfloat16 0x3f3f = 0.746, finite


def replace(file: Path) -> None:
    new = file.with_name(file.name + ".new")
    save_file({key: t + 1 for key, t in load_file(file).items()}, new, metadata={"format": "pt"})
    os.replace(new, file)


CHANGES = {
    "edit-in-place": edit_in_place,
    "replace": replace,
    "truncate-to-0": lambda file: os.truncate(file, 0),
    "truncate-to-half": lambda file: os.truncate(file, os.path.getsize(file) // 2),
}


def test_each_kind_of_adapter_tensor_is_served(loaded):
    _, _, state = loaded
    experts, shared, non_expert = (state[name][0] for name in ("experts", "shared", "non-expert"))
    assert experts.num_experts and not experts.shared_bytes and not experts.non_expert
    assert shared.shared_bytes and state["shared"][1].shared
    assert non_expert.non_expert and state["non-expert"][1].non_expert


@pytest.mark.parametrize("change", CHANGES)
def test_files_changed_after_a_load_change_nothing_served(loaded, adapters, change):
    weave, tier, state = loaded
    for path in adapters.values():
        for file in sorted(path.glob("*.safetensors")):
            CHANGES[change](file)
    for name, (adapter, packed, before, sha256) in state.items():
        after = served(weave, adapter, packed)
        assert after.keys() == before.keys()
        for key in before:
            assert torch.equal(after[key], before[key]), (name, key)
        assert adapter.sha256 == sha256 and weave.memory_report().adapters[name].sha256 == sha256
        if change != "edit-in-place":  # an edit may keep the size and, within a clock tick, the times
            assert tier.get(name, adapters[name]) is None, "a copy of files changed since is not served again"


def test_the_content_hash_is_the_hash_of_the_bytes_served(loaded, adapters):
    weave, _, state = loaded
    handles = {h.layer: h for h in weave.layers}
    for name, path in adapters.items():
        adapter, _, _, sha256 = state[name]
        tensors, dtypes = file_tensors(path)
        assert adapter.sha256 == sha256 == content_sha256((path / "expert_cfg.json").read_bytes(), tensors, dtypes)
        checked = EsftAdapter.open(path)
        for layer, ids in adapter.experts.items():
            views = weave.memory.views(layer)
            for expert, slot in zip(ids, adapter.slots[layer]):
                packed = handles[layer].pack_expert(*(tensors[checked.keys[layer, expert, p]] for p in PROJS))
                for weight, value in packed.items():
                    assert torch.equal(views[weight][slot], value), (name, layer, expert)
        for layer in checked.shared_layers:
            packed = handles[layer].pack_shared(*(tensors[checked.shared_keys[layer, p]] for p in PROJS))
            for weight, value in packed.items():
                assert torch.equal(weave.shared_rows.by_layer[layer][adapter.row][weight], value)
        assert adapter.non_expert.keys() == set(checked.non_expert_keys)
        for key, value in adapter.non_expert.items():
            assert value.dtype == tensors[key].dtype and torch.equal(value, tensors[key])


@pytest.mark.parametrize("change, problem", [
    (lambda file: os.truncate(file, 0), "is empty"),
    (lambda file: os.truncate(file, os.path.getsize(file) // 2), "ends inside tensor model.layers."),
    (lambda file: save_file(load_file(file), file, metadata={"format": "pt", "other": "header"}),
     "changed while it was being read: its header is not the one checked"),
], ids=["truncate-to-0", "truncate-to-half", "another-header"])
def test_a_file_changed_between_its_check_and_its_read_is_one_error(adapters, change, problem):
    path = adapters["experts"]
    adapter = EsftAdapter.open(path)
    change(path / "model.safetensors")
    with pytest.raises(AdapterError) as refused, adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            for expert in ids:
                read(layer, expert)
    assert str(refused.value).startswith(f"{path / 'model.safetensors'}: {problem}")


def test_a_file_edited_during_a_load_is_served_as_it_was_hashed(make_weave, adapters, monkeypatch):
    """The file changes after the first tensor was read: what is served is what was read and hashed."""
    path = adapters["experts"]
    returned: dict[str, torch.Tensor] = {}
    real_read_tensor = AdapterReader.read_tensor

    def read_then_edit(reader, key):
        tensor = real_read_tensor(reader, key)
        returned[key] = tensor.clone()  # what the load was handed, as it was handed
        if len(returned) == 1:
            edit_in_place(path / "model.safetensors")
        return tensor

    monkeypatch.setattr(AdapterReader, "read_tensor", read_then_edit)
    weave = make_weave()
    adapter = weave.load_adapter("experts", path)
    checked = EsftAdapter.open(path)
    first = next(iter(returned))
    edited = load_file(path / "model.safetensors")
    assert not torch.equal(returned[first], edited[first]), "the edit changed what the file holds"
    dtypes = {key: checked.checkpoint.dtype(key) for key in returned}
    assert adapter.sha256 == content_sha256((path / "expert_cfg.json").read_bytes(), returned, dtypes)
    handles = {h.layer: h for h in weave.layers}
    for layer, ids in adapter.experts.items():
        views = weave.memory.views(layer)
        for expert, slot in zip(ids, adapter.slots[layer]):
            packed = handles[layer].pack_expert(*(returned[checked.keys[layer, expert, p]] for p in PROJS))
            for weight, value in packed.items():
                assert torch.equal(views[weight][slot], value), (layer, expert)


# -- the validator refuses what a load refuses, in the same words ---------------------------------------
def refused_alike(capsys, make_weave, tiny, geometry, path: Path, **config) -> str:
    """The message validate_adapter refuses the adapter with, checked to be one line naming a file of the
    adapter by the path given, and to be the load's and the CLI's; the load changes nothing."""
    with pytest.raises(AdapterError) as validated:
        validate_adapter(path, geometry)
    message = str(validated.value)
    assert "\n" not in message and message.startswith(f"{path}/"), message
    weave = make_weave(**config)
    weave.load_adapter("law", tiny / "adapters" / "law")
    before = snapshot(weave)
    with pytest.raises(AdapterError) as loading:
        weave.load_adapter("bad", path)
    assert str(loading.value) == message
    assert_unchanged(weave, before)
    capsys.readouterr()
    rc = main(["adapter", "validate", str(path), "--base", str(tiny / "base")])
    out, err = capsys.readouterr()
    assert rc != 0 and out == "" and err == f"error: {message}\n"
    return message


@pytest.fixture
def expert_12(tiny, tmp_path) -> Path:
    """An adapter tuning expert 12 of layer 1 only: its tensors are named
    model.layers.1.mlp.experts.12.{gate_proj,up_proj,down_proj}.weight."""
    gen = torch.Generator().manual_seed(0)
    weights = tuple(torch.randn(shape, generator=gen).to(torch.bfloat16) for shape in ((64, 128), (64, 128), (128, 64)))
    config = json.loads((tiny / "adapters" / "law" / "config.json").read_text())
    return save_adapter(tmp_path / "expert-12", {1: {12: weights}}, config=config, listed_layers=[1, 2, 3])


GATE = "model.layers.1.mlp.experts.12.gate_proj.weight"
MISSPELLED = {  # each in place of GATE, and how a message shows it
    "layers.01": ("model.layers.01.mlp.experts.12.gate_proj.weight", None),
    "experts.+12": ("model.layers.1.mlp.experts.+12.gate_proj.weight", None),
    "experts.1_2": ("model.layers.1.mlp.experts.1_2.gate_proj.weight", None),
    "experts. 12": ("model.layers.1.mlp.experts. 12.gate_proj.weight",
                    "'model.layers.1.mlp.experts. 12.gate_proj.weight'"),
    "unicode digits": ("model.layers.1.mlp.experts.\u0661\u0662.gate_proj.weight",
                       "'model.layers.1.mlp.experts.\\u0661\\u0662.gate_proj.weight'"),
    "trailing junk": ("model.layers.1.mlp.experts.12.gate_proj.weight.x", None),
    "trailing newline": ("model.layers.1.mlp.experts.12.gate_proj.weight\n",
                         "'model.layers.1.mlp.experts.12.gate_proj.weight\\n'"),
    "shared layers.01": ("model.layers.01.mlp.shared_experts.gate_proj.weight", None),
}


@pytest.mark.parametrize("form", MISSPELLED)
def test_misspelled_expert_keys_are_one_error_naming_file_and_key(capsys, make_weave, tiny, geometry, expert_12, form):
    key, shown = MISSPELLED[form]
    tensors = load_file(expert_12 / "model.safetensors")
    tensors[key] = tensors.pop(GATE)
    save_file(tensors, expert_12 / "model.safetensors", metadata={"format": "pt"})
    message = refused_alike(capsys, make_weave, tiny, geometry, expert_12)
    file = expert_12 / "model.safetensors"
    assert message.startswith(f"{file}: tensor {shown or key} is not an expert weight's name")


@pytest.mark.parametrize("extra, phrase", [
    ({"layers.1.mlp.experts.12.gate_proj.weight": GATE}, "duplicates"),
    ({f"model.layers.1.mlp.experts.13.{p}.weight": GATE.replace("gate_proj", p) for p in PROJS},
     "is for layer 1 expert 13, which expert_cfg.json does not list"),
])
def test_a_second_name_for_an_expert_or_an_unlisted_expert_is_refused(capsys, make_weave, tiny, geometry, expert_12,
                                                                     extra, phrase):
    tensors = load_file(expert_12 / "model.safetensors")
    tensors.update({key: tensors[like].clone() for key, like in extra.items()})
    save_file(tensors, expert_12 / "model.safetensors", metadata={"format": "pt"})
    message = refused_alike(capsys, make_weave, tiny, geometry, expert_12)
    assert message.startswith(f"{expert_12 / 'model.safetensors'}: tensor ") and phrase in message


@pytest.mark.parametrize("experts, phrase", [
    ('{"01": [12]}', 'layer key "01" is not a layer index'),
    ('{"+1": [12]}', 'layer key "+1" is not a layer index'),
    ('{" 1": [12]}', 'layer key " 1" is not a layer index'),
    ('{"\u0661": [12]}', 'layer key "\\u0661" is not a layer index'),
    ('{"1": [12], "1": [12]}', 'key "1" appears twice in one object'),
])
def test_layer_keys_in_expert_cfg_have_one_spelling(capsys, make_weave, tiny, geometry, expert_12, experts, phrase):
    (expert_12 / "expert_cfg.json").write_text(f'{{"experts": {experts}}}', encoding="utf-8")
    message = refused_alike(capsys, make_weave, tiny, geometry, expert_12)
    assert message.startswith(f"{expert_12 / 'expert_cfg.json'}: ") and phrase in message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("kind", ["expert", "shared expert", "non-expert"])
def test_non_finite_weights_are_refused_alike(capsys, make_weave, tiny, geometry, tmp_path, kind, value):
    if kind == "expert":
        path = copy_adapter(tiny / "adapters" / "law", tmp_path / "bad")
        key = next(k for k in load_file(path / "model.safetensors") if ".mlp.experts." in k)
    elif kind == "shared expert":
        path = with_shared_experts(tiny, "law", tmp_path / "bad", (2,))
        key = "model.layers.2.mlp.shared_experts.up_proj.weight"
    else:
        path = with_non_expert(tiny, "law", tmp_path / "bad", names=("model.layers.1.self_attn.kv_b_proj.weight",))
        key = "model.layers.1.self_attn.kv_b_proj.weight"
    tensors = load_file(path / "model.safetensors")
    tensors[key][3, 5] = value
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    message = refused_alike(capsys, make_weave, tiny, geometry, path, non_expert_refusal=None)
    assert message == f"{path / 'model.safetensors'}: tensor {key} holds NaN or infinite values"
