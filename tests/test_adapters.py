import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter, check_adapter, extract_adapter, validate_adapter
from expertweave_ascend.adapters import checkpoint as checkpoint_module
from expertweave_ascend.adapters.esft import finite
from expertweave_ascend.cli import main
from expertweave_ascend.errors import AdapterError

ADAPTERS = ("law", "math", "code")
PROJS = ("gate_proj", "up_proj", "down_proj")
HIDDEN, INTER, NUM_EXPERTS = 128, 64, 16
EXPERT_BYTES = 3 * HIDDEN * INTER * 2


def cfg_of(path: Path) -> dict:
    return json.loads((path / "expert_cfg.json").read_text())


def write_cfg(path: Path, cfg: dict) -> None:
    (path / "expert_cfg.json").write_text(json.dumps(cfg))


def edit_cfg(path: Path, **changes) -> None:
    write_cfg(path, {**cfg_of(path), **changes})


def weights_file(path: Path) -> Path:
    return path / "model.safetensors"


def expert_key(layer: int, expert: int, proj: str, prefix: str = "model.") -> str:
    return f"{prefix}layers.{layer}.mlp.experts.{expert}.{proj}.weight"


def expert_tensors(layer: int, expert: int, dtype=torch.bfloat16, inter: int = INTER) -> dict[str, torch.Tensor]:
    shapes = {"gate_proj": (inter, HIDDEN), "up_proj": (inter, HIDDEN), "down_proj": (HIDDEN, inter)}
    return {expert_key(layer, expert, p): torch.randn(shapes[p]).to(dtype) for p in PROJS}


def add_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    merged = {**load_file(weights_file(path)), **tensors}
    save_file(merged, weights_file(path), metadata={"format": "pt"})


def list_expert(path: Path, layer: int, expert: int) -> None:
    cfg = cfg_of(path)
    cfg["experts"].setdefault(str(layer), []).append(expert)
    write_cfg(path, cfg)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def validate_cli(capsys, adapter: Path, base: Path) -> tuple[int, str, str]:
    return cli(capsys, "adapter", "validate", str(adapter), "--base", str(base))


def assert_one_error(rc: int, err: str, file: Path, phrase: str) -> None:
    assert rc == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {file}: "), lines[0]
    assert phrase in lines[0]
    assert "Traceback" not in err


def read_all(adapter: EsftAdapter) -> dict[tuple[int, int], tuple[torch.Tensor, ...]]:
    with adapter.reading() as read:
        return {(layer, e): read(layer, e) for layer, ids in adapter.experts.items() for e in ids}


@pytest.fixture
def base(tiny) -> Path:
    return tiny / "base"


# --- opening -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_open_matches_expert_cfg(tiny, name):
    path = tiny / "adapters" / name
    adapter = EsftAdapter.open(path)
    listed = {int(layer): tuple(ids) for layer, ids in cfg_of(path)["experts"].items()}
    assert adapter.experts == listed
    assert adapter.name == name
    assert adapter.num_experts == sum(map(len, listed.values()))
    assert adapter.nbytes == adapter.num_experts * EXPERT_BYTES
    assert adapter.dtypes == {"BF16"}
    assert set(adapter.keys) == {(layer, e, p) for layer, ids in listed.items() for e in ids for p in PROJS}
    assert adapter.shared_experts is False and adapter.non_expert_modules is False


@pytest.mark.parametrize("name", ADAPTERS)
def test_tiny_adapter_spread(tiny, geometry, name):
    adapter = EsftAdapter.open(tiny / "adapters" / name)
    assert set(adapter.experts) == set(geometry.moe_layers) == {1, 2, 3}
    counts = sorted(len(ids) for ids in adapter.experts.values())
    assert counts[0] == 0
    assert counts[-1] == NUM_EXPERTS // 2
    assert all(1 <= c <= 4 for c in counts[1:-1])
    assert geometry.expert_nbytes == EXPERT_BYTES


def test_tiny_adapters_differ(tiny):
    layouts = [EsftAdapter.open(tiny / "adapters" / name).experts for name in ADAPTERS]
    empty_layers = [next(layer for layer, ids in layout.items() if not ids) for layout in layouts]
    assert len(set(empty_layers)) == len(ADAPTERS)


def test_reading_gives_expert_shapes(tiny):
    adapter = EsftAdapter.open(tiny / "adapters" / "law")
    layer, ids = next((layer, ids) for layer, ids in adapter.experts.items() if ids)
    with adapter.reading() as read:
        gate, up, down = read(layer, ids[0])
    assert gate.shape == up.shape == (INTER, HIDDEN)
    assert down.shape == (HIDDEN, INTER)
    assert gate.dtype == torch.bfloat16
    stored = load_file(weights_file(adapter.path))
    assert torch.equal(down, stored[expert_key(layer, ids[0], "down_proj")])


def test_old_key_spelling_without_model_prefix(tiny, geometry, adapter_copy):
    path = adapter_copy("math")
    original = load_file(weights_file(path))
    save_file({k.removeprefix("model."): v for k, v in original.items()}, weights_file(path))
    assert all(not k.startswith("model.") for k in load_file(weights_file(path)))

    adapter = validate_adapter(path, geometry)
    assert all(not key.startswith("model.") for key in adapter.keys.values())
    reference = read_all(EsftAdapter.open(tiny / "adapters" / "math"))
    renamed = read_all(adapter)
    assert renamed.keys() == reference.keys() and reference
    for k in reference:
        assert all(torch.equal(a, b) for a, b in zip(renamed[k], reference[k]))


def test_cfg_experts_in_any_order_and_string_keys(adapter_copy):
    path = adapter_copy("law")
    cfg = cfg_of(path)
    cfg["experts"]["2"] = list(reversed(cfg["experts"]["2"]))
    write_cfg(path, cfg)
    assert EsftAdapter.open(path).experts[2] == tuple(cfg["experts"]["2"])


# --- validate ------------------------------------------------------------------------------------


def test_validate_ok(capsys, tiny, base):
    for name in ADAPTERS:
        rc, out, err = validate_cli(capsys, tiny / "adapters" / name, base)
        assert rc == 0, err
        assert out.startswith(f"ok {tiny / 'adapters' / name}")
        assert err == ""


def test_validate_ok_reports_counts(capsys, tiny, base):
    adapter = EsftAdapter.open(tiny / "adapters" / "code")
    layers = sum(1 for ids in adapter.experts.values() if ids)
    rc, out, _ = validate_cli(capsys, adapter.path, base)
    assert rc == 0
    assert f"{adapter.num_experts} experts in {layers} layers" in out


def test_missing_expert_cfg(capsys, adapter_copy, base):
    path = adapter_copy()
    (path / "expert_cfg.json").unlink()
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "missing")


def test_malformed_expert_cfg(capsys, adapter_copy, base):
    path = adapter_copy()
    (path / "expert_cfg.json").write_text('{"experts": {"1": [0, 1]')
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "not valid JSON")


@pytest.mark.parametrize("experts", [[1, 2], "1:2", None])
def test_experts_not_an_object(capsys, adapter_copy, base, experts):
    path = adapter_copy()
    edit_cfg(path, experts=experts)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", '"experts" must be an object')


def test_expert_ids_not_integers(capsys, adapter_copy, base):
    path = adapter_copy()
    edit_cfg(path, experts={"2": ["3"]})
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "expected a list of integer expert ids")


def test_truncated_safetensors(capsys, adapter_copy, base):
    path = adapter_copy()
    data = weights_file(path).read_bytes()
    weights_file(path).write_bytes(data[: len(data) // 2])
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "not a valid safetensors file")


@pytest.mark.parametrize("content", [b"", b"garbage, not a safetensors file", b"\xff" * 64])
def test_garbage_safetensors(capsys, adapter_copy, base, content):
    path = adapter_copy()
    weights_file(path).write_bytes(content)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "not a valid safetensors file" if content else "is empty")


# -- files an adapter directory must not make us read ---------------------------------------------------
def test_a_fifo_is_refused_without_being_opened(capsys, adapter_copy, base):
    path = adapter_copy()
    weights_file(path).unlink()
    os.mkfifo(weights_file(path))  # opening it would block until a writer came
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "is a FIFO, device or socket, not a regular file; it was not read")


def test_a_device_or_proc_file_named_as_config_is_refused(capsys, adapter_copy, base):
    path = adapter_copy()
    (path / "expert_cfg.json").unlink()
    (path / "expert_cfg.json").symlink_to("/dev/zero")
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "is a FIFO, device or socket")
    (path / "expert_cfg.json").unlink()
    (path / "expert_cfg.json").symlink_to("/proc/self/status")
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "is empty (or a /proc-like file that reports no size)")


def test_an_oversized_or_deeply_nested_config_is_refused(capsys, adapter_copy, base):
    path = adapter_copy()
    (path / "expert_cfg.json").write_text(" " * (1 << 20) + "{}")
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "more than the 1048576 this file may hold; it was not read")
    (path / "expert_cfg.json").write_text("[" * 100_000 + "]" * 100_000)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "not valid JSON (nested too deeply)")


def test_symlink_loops_and_overlong_paths_say_what_the_system_said(capsys, adapter_copy, base, tmp_path):
    path = adapter_copy()
    (path / "expert_cfg.json").unlink()
    (path / "expert_cfg.json").symlink_to(path / "expert_cfg.json")
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "cannot be read (Too many levels of symbolic links)")
    long = tmp_path / ("x" * 300)
    rc, _, err = validate_cli(capsys, long, base)
    assert_one_error(rc, err, long, "cannot be listed (File name too long)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_directory_is_reported_as_such(capsys, adapter_copy, base):
    path = adapter_copy()
    path.chmod(0)
    try:
        rc, _, err = validate_cli(capsys, path, base)
    finally:
        path.chmod(0o755)
    assert_one_error(rc, err, path, "(Permission denied)")


def test_no_safetensors_file(capsys, adapter_copy, base):
    path = adapter_copy()
    weights_file(path).unlink()
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path, "no .safetensors files")


def test_listed_expert_without_tensors(capsys, adapter_copy, base):
    path = adapter_copy("law")
    assert 0 not in cfg_of(path)["experts"]["2"]
    list_expert(path, 2, 0)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path, "layer 2 expert 0 is listed in expert_cfg.json but has no")
    assert "gate_proj, up_proj, down_proj" in err


def test_listed_expert_missing_one_projection(capsys, adapter_copy, base):
    path = adapter_copy("law")
    tensors = load_file(weights_file(path))
    del tensors[expert_key(2, 3, "up_proj")]
    save_file(tensors, weights_file(path))
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path, "layer 2 expert 3 is listed in expert_cfg.json but has no up_proj tensor")


def test_tensors_for_unlisted_expert(capsys, adapter_copy, base):
    path = adapter_copy("law")
    cfg = cfg_of(path)
    cfg["experts"]["2"].remove(3)
    write_cfg(path, cfg)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "layer 2 expert 3, which expert_cfg.json does not list")


def test_wrong_shape(capsys, adapter_copy, base):
    path = adapter_copy("law")
    add_tensors(path, expert_tensors(3, 1, inter=32))
    list_expert(path, 3, 1)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "mlp.experts.1.")
    assert "shape [32, 128], expected [64, 128]" in err or "shape [128, 32], expected [128, 64]" in err


def test_wrong_dtype(capsys, adapter_copy, base):
    path = adapter_copy("law")
    add_tensors(path, expert_tensors(3, 1, dtype=torch.float32))
    list_expert(path, 3, 1)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "has dtype F32, the base experts are BF16")


def test_expert_id_out_of_range(capsys, adapter_copy, base):
    path = adapter_copy("law")
    add_tensors(path, expert_tensors(3, NUM_EXPERTS))
    list_expert(path, 3, NUM_EXPERTS)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "layer 3 lists expert 16, out of range")


def test_dense_layer_with_experts(capsys, adapter_copy, base):
    path = adapter_copy("law")
    add_tensors(path, expert_tensors(0, 1))
    list_expert(path, 0, 1)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "layer 0 is not a MoE layer")


def test_dense_layer_listed_empty_is_fine(geometry, adapter_copy):
    path = adapter_copy("law")
    cfg = cfg_of(path)
    cfg["experts"]["0"] = []
    write_cfg(path, cfg)
    assert validate_adapter(path, geometry).experts[0] == ()


def test_layer_that_does_not_exist(capsys, adapter_copy, base):
    path = adapter_copy("law")
    add_tensors(path, expert_tensors(9, 1))
    list_expert(path, 9, 1)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "expert_cfg.json", "layer 9 does not exist")


def shared_tensors(layer: int, inter: int = INTER, dtype=torch.bfloat16, projs=("gate_proj", "up_proj", "down_proj")):
    shapes = {"gate_proj": (inter, HIDDEN), "up_proj": (inter, HIDDEN), "down_proj": (HIDDEN, inter)}
    return {f"model.layers.{layer}.mlp.shared_experts.{p}.weight": torch.zeros(shapes[p], dtype=dtype) for p in projs}


def test_shared_experts_are_accepted_under_the_flag(capsys, adapter_copy, base, geometry):
    path = adapter_copy()
    edit_cfg(path, shared_experts=True)
    add_tensors(path, {**shared_tensors(1), **shared_tensors(3)})
    rc, out, _ = validate_cli(capsys, path, base)
    assert rc == 0 and out.startswith("ok")
    adapter = validate_adapter(path, geometry)
    assert adapter.shared_layers == (1, 3)
    assert adapter.nbytes == adapter.num_experts * EXPERT_BYTES + 2 * EXPERT_BYTES  # one shared expert a layer


@pytest.mark.parametrize("tensors,phrase", [
    ({}, '"shared_experts" is true but the adapter holds no shared-expert tensor'),
    (shared_tensors(1, projs=("gate_proj", "up_proj")), "layer 1's shared experts have no down_proj tensor"),
])
def test_shared_expert_flag_without_its_tensors(capsys, adapter_copy, base, tensors, phrase):
    path = adapter_copy()
    edit_cfg(path, shared_experts=True)
    add_tensors(path, tensors)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path if tensors else path / "expert_cfg.json", phrase)


@pytest.mark.parametrize("tensors,phrase", [
    (shared_tensors(1, inter=32), "shared_experts.down_proj.weight has shape [128, 32], expected [128, 64]"),
    (shared_tensors(1, dtype=torch.float16), "has dtype F16, the base experts are BF16"),
    (shared_tensors(0), "layer 0 is not a MoE layer"),
])
def test_bad_shared_expert_tensors(capsys, adapter_copy, base, tensors, phrase):
    path = adapter_copy()
    edit_cfg(path, shared_experts=True)
    add_tensors(path, tensors)
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), phrase)


@pytest.mark.parametrize("field,value", [("hidden_size", 256), ("moe_intermediate_size", 32),
                                         ("n_routed_experts", 64)])
def test_adapter_made_for_different_base(capsys, adapter_copy, base, field, value):
    path = adapter_copy()
    config = json.loads((path / "config.json").read_text())
    config[field] = value
    (path / "config.json").write_text(json.dumps(config))
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, path / "config.json", f"{field} is {value} but the base has")
    assert "different base model" in err


def test_non_expert_tensor_refused(capsys, adapter_copy, base):
    path = adapter_copy()
    add_tensors(path, {"model.layers.1.mlp.gate.weight": torch.zeros(NUM_EXPERTS, HIDDEN, dtype=torch.bfloat16)})
    rc, _, err = validate_cli(capsys, path, base)
    assert_one_error(rc, err, weights_file(path), "model.layers.1.mlp.gate.weight is not a routed- or shared-expert weight")


def test_shared_expert_tensor_refused_without_the_flag(adapter_copy, geometry):
    path = adapter_copy()
    add_tensors(path, {"model.layers.1.mlp.shared_experts.up_proj.weight":
                       torch.zeros(INTER, HIDDEN, dtype=torch.bfloat16)})
    with pytest.raises(AdapterError) as info:
        validate_adapter(path, geometry)
    assert info.value.file == str(weights_file(path))
    assert ('shared_experts.up_proj.weight is a shared-expert weight, but expert_cfg.json says "shared_experts": '
            "false") in info.value.problem


def test_validate_not_a_directory(capsys, tmp_path, base):
    rc, _, err = validate_cli(capsys, tmp_path / "nowhere", base)
    assert_one_error(rc, err, tmp_path / "nowhere", "not a directory")


@pytest.mark.parametrize("damage", ["truncate", "drop_cfg", "wrong_base"])
def test_subprocess_error_has_no_traceback(adapter_copy, base, damage):
    path = adapter_copy()
    if damage == "truncate":
        data = weights_file(path).read_bytes()
        weights_file(path).write_bytes(data[:100])
        file, phrase = weights_file(path), "not a valid safetensors file"
    elif damage == "drop_cfg":
        (path / "expert_cfg.json").unlink()
        file, phrase = path / "expert_cfg.json", "missing"
    else:
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "hidden_size": 4096}))
        file, phrase = path / "config.json", "hidden_size is 4096"
    proc = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "adapter", "validate", str(path),
                           "--base", str(base)], capture_output=True, text=True, timeout=120)
    assert proc.stdout == ""
    assert_one_error(proc.returncode, proc.stderr, file, phrase)


def test_subprocess_validate_ok(tiny, base):
    path = tiny / "adapters" / "math"
    proc = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "adapter", "validate", str(path),
                           "--base", str(base)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"ok {path}")


# --- inspect -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ADAPTERS)
def test_inspect_json(capsys, tiny, name):
    path = tiny / "adapters" / name
    rc, out, err = cli(capsys, "adapter", "inspect", str(path), "--json")
    assert rc == 0, err
    info = json.loads(out)
    cfg = cfg_of(path)
    assert info["experts"] == cfg["experts"]
    assert info["num_experts"] == sum(map(len, cfg["experts"].values()))
    assert info["bytes"] == info["num_experts"] * EXPERT_BYTES
    assert info["dtype"] == ["BF16"]
    assert info["shared_experts"] is False and info["non_expert_modules"] is False
    assert Path(info["path"]) == path


def test_inspect_json_reports_flags(capsys, adapter_copy):
    path = adapter_copy("code")
    edit_cfg(path, shared_experts=True)
    add_tensors(path, shared_tensors(2))
    rc, out, _ = cli(capsys, "adapter", "inspect", str(path), "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["shared_experts"] is True and info["non_expert_modules"] is False


def test_inspect_text(capsys, tiny):
    path = tiny / "adapters" / "law"
    adapter = EsftAdapter.open(path)
    rc, out, _ = cli(capsys, "adapter", "inspect", str(path))
    assert rc == 0
    assert f"{adapter.num_experts} experts" in out
    assert "dtype BF16" in out
    for layer, ids in adapter.experts.items():
        assert f"layer {layer:>3}: {len(ids):>3} experts {list(ids)}" in out


def test_inspect_broken_adapter(capsys, adapter_copy):
    path = adapter_copy()
    (path / "expert_cfg.json").write_text("[]")
    rc, _, err = cli(capsys, "adapter", "inspect", str(path))
    assert_one_error(rc, err, path / "expert_cfg.json", "expected a JSON object")


# --- extract -------------------------------------------------------------------------------------

TUNED = {1: {2: PROJS, 5: ("down_proj",)}, 3: {15: PROJS}}
DELTA = 0.5


@pytest.fixture
def finetuned(base, tmp_path) -> Path:
    """A copy of the base whose TUNED expert projections moved by DELTA."""
    out = tmp_path / "finetuned"
    shutil.copytree(base, out)
    tensors = load_file(weights_file(out))
    for layer, experts in TUNED.items():
        for expert, projs in experts.items():
            for proj in projs:
                key = expert_key(layer, expert, proj)
                tensors[key] = (tensors[key].float() + DELTA).to(torch.bfloat16)
    save_file(tensors, weights_file(out), metadata={"format": "pt"})
    return out


def extract_cli(capsys, base: Path, finetuned: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "adapter", "extract", "--base", str(base), "--finetuned", str(finetuned),
               "--out", str(out), *extra)


def perturb(path: Path, key: str) -> None:
    tensors = load_file(weights_file(path))
    tensors[key] = (tensors[key].float() + DELTA).to(torch.bfloat16)
    save_file(tensors, weights_file(path), metadata={"format": "pt"})


def assert_extract_refused(rc: int, err: str, file: Path, phrase: str) -> None:
    assert rc == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {file}: "), err
    assert phrase in lines[0]


def test_extract_finds_tuned_experts(capsys, base, finetuned, geometry, tmp_path):
    out = tmp_path / "adapter"
    rc, stdout, err = extract_cli(capsys, base, finetuned, out)
    assert rc == 0, err
    assert "3 tuned experts in 2 layers" in stdout
    cfg = cfg_of(out)
    assert cfg["experts"] == {"1": [2, 5], "2": [], "3": [15]}
    assert cfg["shared_experts"] is False and cfg["non_expert_modules"] is False

    adapter = validate_adapter(out, geometry)
    tuned = load_file(weights_file(finetuned))
    base_tensors = load_file(weights_file(base))
    assert len(load_file(weights_file(out))) == 3 * 3
    with adapter.reading() as read:
        for layer, experts in TUNED.items():
            for expert in experts:
                for proj, tensor in zip(PROJS, read(layer, expert)):
                    key = expert_key(layer, expert, proj)
                    assert torch.equal(tensor, tuned[key])
                    if proj not in TUNED[layer][expert]:
                        assert torch.equal(tensor, base_tensors[key])
    assert json.loads((out / "config.json").read_text()) == json.loads((finetuned / "config.json").read_text())


def test_extract_api_returns_tuned(base, finetuned, tmp_path):
    tuned = extract_adapter(base, finetuned, tmp_path / "adapter", progress=False)
    assert tuned == {layer: sorted(experts) for layer, experts in TUNED.items()}


def test_extract_round_trips_a_tiny_adapter(tiny, base, tmp_path):
    source = EsftAdapter.open(tiny / "adapters" / "code")
    merged = tmp_path / "merged"
    shutil.copytree(base, merged)
    tensors = load_file(weights_file(merged))
    for (layer, expert), weights in read_all(source).items():
        for proj, weight in zip(PROJS, weights):
            tensors[expert_key(layer, expert, proj)] = weight
    save_file(tensors, weights_file(merged), metadata={"format": "pt"})

    tuned = extract_adapter(base, merged, tmp_path / "adapter", progress=False)
    assert tuned == {layer: list(ids) for layer, ids in source.experts.items() if ids}
    assert cfg_of(tmp_path / "adapter") == cfg_of(source.path)


def test_extract_finetuned_with_old_key_spelling(base, finetuned, tmp_path):
    tensors = load_file(weights_file(finetuned))
    save_file({k.removeprefix("model."): v for k, v in tensors.items()}, weights_file(finetuned))
    tuned = extract_adapter(base, finetuned, tmp_path / "adapter", progress=False)
    assert tuned == {layer: sorted(experts) for layer, experts in TUNED.items()}


def test_extract_atol_above_perturbation(capsys, base, finetuned, tmp_path):
    out = tmp_path / "adapter"
    rc, _, err = extract_cli(capsys, base, finetuned, out, "--atol", str(4 * DELTA))
    assert_extract_refused(rc, err, finetuned, "no routed expert differs from the base")
    assert not (out / "model.safetensors").exists()


def test_extract_atol_below_perturbation(capsys, base, finetuned, tmp_path):
    rc, _, err = extract_cli(capsys, base, finetuned, tmp_path / "adapter", "--atol", str(DELTA / 4))
    assert rc == 0, err
    assert cfg_of(tmp_path / "adapter")["experts"] == {"1": [2, 5], "2": [], "3": [15]}


def test_extract_identical_checkpoint(capsys, base, tmp_path):
    out = tmp_path / "adapter"
    rc, _, err = extract_cli(capsys, base, base, out)
    assert_extract_refused(rc, err, base, "no routed expert differs")
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("key", ["model.layers.1.mlp.gate.weight", "model.layers.2.self_attn.o_proj.weight",
                                 "model.layers.3.mlp.shared_experts.up_proj.weight", "lm_head.weight"])
def test_extract_refuses_non_expert_change(capsys, base, finetuned, tmp_path, key):
    perturb(finetuned, key)
    out = tmp_path / "adapter"
    rc, _, err = extract_cli(capsys, base, finetuned, out)
    assert_extract_refused(rc, err, weights_file(finetuned), f"non-expert tensor {key} differs from the base")
    assert not (out / "model.safetensors").exists()


def test_extract_refuses_different_tensor_names(capsys, base, finetuned, tmp_path):
    tensors = load_file(weights_file(finetuned))
    del tensors["model.layers.2.mlp.gate.weight"]
    save_file(tensors, weights_file(finetuned))
    out = tmp_path / "adapter"
    rc, _, err = extract_cli(capsys, base, finetuned, out)
    assert_extract_refused(rc, err, finetuned, "lacks model.layers.2.mlp.gate.weight")
    assert not (out / "model.safetensors").exists()


def test_extract_name_recorded(capsys, base, finetuned, tmp_path):
    out = tmp_path / "adapter"
    rc, stdout, _ = extract_cli(capsys, base, finetuned, out, "--name", "legal")
    assert rc == 0
    assert EsftAdapter.open(out).name == "legal"
    assert "adapter legal" in stdout


# --- laziness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_one_nan_or_infinity_anywhere_is_found(dtype):
    """The check is one min/max reduction: a bad value at the start, the middle, the vectorized loop's tail
    or the last element, in any float dtype an adapter may hold."""
    for n in (1, 7, 64, 65, 4099):
        values = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        assert finite(values) and finite(values.reshape(1, n)) and finite(values[:0])
        for position in {0, n // 2, n - 3 if n > 3 else 0, n - 1}:
            for bad in (float("nan"), float("inf"), float("-inf")):
                damaged = values.clone()
                damaged[position] = bad
                assert not finite(damaged), (n, position, bad)
    assert finite(torch.tensor([7], dtype=torch.int32)), "integers have no infinities"


def corrupt_data_region(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header_len = struct.unpack("<Q", data[:8])[0]
    start = 8 + header_len
    data[start:] = b"\xff" * (len(data) - start)
    path.write_bytes(bytes(data))


def test_open_reads_headers_only(adapter_copy, geometry):
    path = adapter_copy("law")
    corrupt_data_region(weights_file(path))
    adapter = check_adapter(path, geometry)
    assert adapter.nbytes == adapter.num_experts * EXPERT_BYTES
    layer, ids = next((layer, ids) for layer, ids in adapter.experts.items() if ids)
    with adapter.reading() as read, pytest.raises(AdapterError) as excinfo:
        read(layer, ids[0])
    assert str(excinfo.value) == (f"{weights_file(path)}: tensor model.layers.{layer}.mlp.experts.{ids[0]}.gate_proj"
                                  ".weight holds NaN or infinite values")
    with pytest.raises(AdapterError) as validated:
        validate_adapter(path, geometry)  # validating reads the data, as a load does
    assert str(validated.value) == str(excinfo.value)


def test_reading_is_expert_by_expert(tiny, monkeypatch):
    calls: list[str] = []
    real_read_owned = checkpoint_module.read_owned

    def counting(f, key, *args):
        calls.append(key)
        return real_read_owned(f, key, *args)

    monkeypatch.setattr(checkpoint_module, "read_owned", counting)

    adapter = EsftAdapter.open(tiny / "adapters" / "math")
    assert calls == []
    pairs = [(layer, e) for layer, ids in adapter.experts.items() for e in ids][:3]
    with adapter.reading() as read:
        assert calls == []
        for n, (layer, expert) in enumerate(pairs, start=1):
            read(layer, expert)
            assert len(calls) == 3 * n
            assert calls[-3:] == [expert_key(layer, expert, p) for p in PROJS]


def test_errors_say_what_was_read_and_their_public_form_does_not(tmp_path, base):
    path = tmp_path / "foreign"
    path.mkdir()
    (path / "expert_cfg.json").write_text('{"experts": {"1": [0]}, "shared_experts": "yes-secret"}')
    save_file({"x": torch.zeros(1)}, weights_file(path))
    with pytest.raises(AdapterError) as excinfo:
        EsftAdapter.open(path)
    assert "yes-secret" in str(excinfo.value)
    assert excinfo.value.public_message == f"{path / 'expert_cfg.json'}: \"shared_experts\" must be true or false"
    (path / "expert_cfg.json").write_text('{"experts": {"1": [0]}}')
    save_file({"secret.tensor": torch.zeros(1)}, weights_file(path))
    with pytest.raises(AdapterError) as excinfo:
        EsftAdapter.open(path)
    assert "secret.tensor" in str(excinfo.value) and "secret" not in excinfo.value.public_message
