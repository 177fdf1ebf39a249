"""Expert sharing over the transformers reference integration: identical experts are held once (the base's
own, or one refcounted slot for every adapter holding them), near-duplicates only when consolidation is on,
and every output still equals its merged model (verify_hf) exactly while it is off."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.cli import main
from expertweave_ascend.errors import ExpertWeaveError
from expertweave_ascend.tiny import make_tiny
from expertweave_ascend.verify import verify_hf
from expertweave_ascend.weave import ExpertWeave

GRANULE = 64 << 10
EXPERT_BYTES = (2 * 64 * 128 + 128 * 64) * 4  # one expert of the tiny model in the float32 engine layout


def base_experts_adapter(tiny: Path, like: str, out: Path) -> Path:
    """An adapter listing the experts `like` tunes, holding the base's own bytes for each."""
    shutil.copytree(tiny / "adapters" / like, out)
    tensors = load_file(out / "model.safetensors")
    with safe_open(tiny / "base" / "model.safetensors", framework="pt") as base:
        for key in tensors:
            tensors[key] = base.get_tensor(key)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def changed_version(tiny: Path, like: str, out: Path, changed: int) -> tuple[Path, list[tuple[int, int]]]:
    """A copy of adapter `like` with its first `changed` experts altered; returns it and those (layer, expert)."""
    shutil.copytree(tiny / "adapters" / like, out)
    tensors = load_file(out / "model.safetensors")
    experts = EsftAdapter.open(out).experts
    picked = [(layer, e) for layer, ids in experts.items() for e in ids][:changed]
    for layer, e in picked:
        key = f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"
        tensors[key] = (tensors[key].float() + 0.01).to(tensors[key].dtype)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out, picked


@pytest.fixture
def make_weave(make_weave):
    """conftest's, with room for 48 adapter experts per layer."""
    return lambda **config: make_weave(**{"adapter_slots": 48, **config})


def adapter_mapped(weave: ExpertWeave) -> int:
    return weave.memory.mapped_bytes - weave.memory.base_mapped_bytes


def test_the_same_adapter_under_two_names_costs_the_bytes_of_one(make_weave, tiny):
    law = tiny / "adapters" / "law"
    alone = make_weave()
    one = alone.load_adapter("law", law)
    weave = make_weave()
    first = weave.load_adapter("law", law)
    second = weave.load_adapter("law-copy", law)
    assert second.slots == first.slots == one.slots
    assert adapter_mapped(weave) == adapter_mapped(alone)
    report = weave.memory_report()
    assert report.adapter_expert_bytes == 2 * first.nbytes
    assert report.adapter_slot_bytes == first.nbytes and report.saved_bytes == first.nbytes
    for name in ("law", "law-copy"):
        entry = report.adapters[name]
        assert entry.shared_slots == first.num_experts and entry.base_experts == 0
        assert entry.saved_bytes == first.nbytes // 2
    assert torch.equal(weave.tables.tensor[:, first.row], weave.tables.tensor[:, second.row])


def test_unloading_one_sharer_keeps_the_others_experts(make_weave, tiny):
    law = tiny / "adapters" / "law"
    weave = make_weave()
    weave.load_adapter("law", law)
    copy = weave.load_adapter("law-copy", law)
    views_before = {layer: {w: t[slots].clone() for w, t in weave.memory.views(layer).items()}
                    for layer, slots in copy.slots.items()}
    mapped = adapter_mapped(weave)
    weave.unload_adapter("law")
    assert adapter_mapped(weave) == mapped, "the shared slots stay mapped for law-copy"
    for layer, slots in copy.slots.items():
        for w, t in weave.memory.views(layer).items():
            assert torch.equal(t[slots], views_before[layer][w])
        assert all(weave.memory.slots[layer].owners[s - 16] == ("law-copy",) for s in slots)
    assert weave.memory_report().adapters["law-copy"].shared_slots == 0
    again = weave.load_adapter("law", law)  # shares law-copy's slots now
    assert again.slots == copy.slots and adapter_mapped(weave) == mapped
    weave.unload_adapter("law-copy")
    weave.unload_adapter("law")
    assert adapter_mapped(weave) == 0
    assert not weave._index.by_position and not weave._index.of_slot


def test_an_adapter_whose_experts_equal_the_base_maps_nothing(make_weave, tiny, tmp_path):
    weave = make_weave()
    same = weave.load_adapter("same", base_experts_adapter(tiny, "law", tmp_path / "same"))
    assert adapter_mapped(weave) == 0
    assert all(weave.memory.slots[layer].free_count == 48 for layer in weave.memory.slots)
    identity = torch.arange(16, dtype=torch.int32).expand(3, 16)
    assert torch.equal(weave.tables.tensor[:, same.row], identity)
    entry = weave.memory_report().adapters["same"]
    assert entry.base_experts == same.num_experts and entry.saved_bytes == same.nbytes
    assert entry.consolidated is None, "bit-identical experts are shared losslessly, not consolidated"
    weave.unload_adapter("same")
    assert adapter_mapped(weave) == 0


def test_a_version_that_changes_a_few_experts_holds_only_those(make_weave, tiny, tmp_path):
    weave = make_weave()
    law = weave.load_adapter("law", tiny / "adapters" / "law")
    mapped = weave.memory.occupied_slot_bytes()
    path, changed = changed_version(tiny, "law", tmp_path / "law-v2", 3)
    v2 = weave.load_adapter("law-v2", path)
    assert weave.memory.occupied_slot_bytes() - mapped == 3 * EXPERT_BYTES
    for layer, ids in law.experts.items():
        for expert, mine, theirs in zip(ids, v2.slots[layer], law.slots[layer]):
            assert (mine != theirs) == ((layer, expert) in changed)
    assert weave.memory_report().adapters["law-v2"].shared_slots == law.num_experts - 3


def test_an_abandoned_load_gives_back_only_its_share(make_weave, tiny):
    law = tiny / "adapters" / "law"
    weave = make_weave()
    first = weave.load_adapter("law", law)
    pending = weave.prepare("law-copy", weave.pack(law))
    weave.abandon(pending)
    assert weave.memory.slots_of("law") == {layer: sorted(s) for layer, s in first.slots.items()}
    assert all(weave.memory.slots[layer].sharers(s) == 1 for layer, slots in first.slots.items() for s in slots)
    weave.unload_adapter("law")
    assert adapter_mapped(weave) == 0 and not weave._index.of_slot


def test_mixed_batch_with_sharers_equals_merged_models(tiny, tmp_path):
    """Consolidation off: the same adapter twice, a version, an adapter of base experts and another adapter
    in one batch, each row equal to its merged model token for token."""
    adapters = {"law": tiny / "adapters" / "law", "law-copy": tiny / "adapters" / "law",
                "law-v2": changed_version(tiny, "law", tmp_path / "law-v2", 3)[0],
                "same": base_experts_adapter(tiny, "math", tmp_path / "same"), "code": tiny / "adapters" / "code"}
    report = verify_hf(tiny / "base", adapters, max_new_tokens=8, granularity=GRANULE)
    assert report.ok, {name: row.tokens_equal for name, row in report.adapters.items()}
    # float32 expert matmuls over a different number of tokens round differently on some CPUs (AVX2: KL ~2e-8)
    assert all(row.agreement == 1.0 and row.mean_kl < 1e-6 for row in report.adapters.values())
    m = report.memory
    law = m.adapters["law"]
    assert m.adapters["law-copy"].shared_slots == law.experts
    assert m.adapters["same"].base_experts == m.adapters["same"].experts
    assert m.saved_bytes == law.bytes + m.adapters["same"].bytes + (law.experts - 3) * EXPERT_BYTES
    assert all(a.consolidated is None for a in m.adapters.values())


# -- near-duplicate consolidation ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def spread(tmp_path_factory) -> Path:
    """The tiny model with adapters whose experts moved by 0.1% .. 100% of their size."""
    out = tmp_path_factory.mktemp("spread")
    make_tiny(out, adapters=3, seed=0, delta_spread=(1e-3, 1.0))
    return out


def relative_distances(spread: Path, name: str) -> dict[str, float]:
    """||adapter expert - base expert|| / ||base expert|| from the files, in float64."""
    adapter = EsftAdapter.open(spread / "adapters" / name)
    out = {}
    with safe_open(spread / "base" / "model.safetensors", framework="pt") as base, adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            for e in ids:
                diff = norm = 0.0
                for proj, tuned in zip(("gate_proj", "up_proj", "down_proj"), read(layer, e)):
                    b = base.get_tensor(f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight").double()
                    diff += float((tuned.double() - b).square().sum())
                    norm += float(b.square().sum())
                out[f"{layer}.{e}"] = (diff / norm) ** 0.5
    return out


def test_make_tiny_delta_spread_moves_experts_by_the_spread(spread):
    distances = [d for name in ("law", "math", "code") for d in relative_distances(spread, name).values()]
    assert min(distances) < 0.01 and max(distances) > 0.3
    assert all(d <= 1.0 * 1.01 for d in distances)


def test_consolidation_off_is_exact_and_on_reports_what_it_did(spread):
    adapters = {name: spread / "adapters" / name for name in ("law", "math", "code")}
    off = verify_hf(spread / "base", adapters, max_new_tokens=8, granularity=GRANULE)
    assert off.ok and all(a.consolidated is None for a in off.memory.adapters.values())
    x = 0.05
    on = verify_hf(spread / "base", adapters, max_new_tokens=8, granularity=GRANULE, consolidate_rel_l2=x)
    assert on.consolidate_rel_l2 == x
    saved = 0
    for name in adapters:
        want = {k: d for k, d in relative_distances(spread, name).items() if d <= x}
        entry = on.memory.adapters[name]
        got = entry.consolidated or {}
        assert set(got) == set(want), name
        assert all(got[k] == pytest.approx(want[k], rel=1e-3, abs=1e-6) for k in want)
        assert entry.base_experts == len(want)
        assert entry.saved_bytes == len(want) * EXPERT_BYTES
        saved += entry.saved_bytes
        row = on.adapters[name]
        assert 0.0 <= row.agreement <= 1.0 and row.mean_kl >= 0.0
    assert saved > 0 and on.memory.saved_bytes == saved
    assert on.memory.adapter_slot_bytes == off.memory.adapter_slot_bytes - saved


def test_consolidation_to_a_resident_adapters_expert(make_weave, tiny, tmp_path):
    """A version whose changed experts are within X of the resident adapter's is served by its slots."""
    weave = make_weave(consolidate_rel_l2=0.1)
    law = weave.load_adapter("law", tiny / "adapters" / "law")
    path, changed = changed_version(tiny, "law", tmp_path / "law-v2", 2)
    v2 = weave.load_adapter("law-v2", path)
    assert v2.slots == law.slots
    assert set(v2.distances) == {f"{layer}.{e}" for layer, e in changed}
    assert all(0 < d <= 0.1 for d in v2.distances.values())
    entry = weave.memory_report().adapters["law-v2"]
    assert entry.shared_slots == law.num_experts and entry.base_experts == 0


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_a_bad_consolidation_threshold_is_one_clear_error(make_weave, value):
    with pytest.raises(ExpertWeaveError, match=r"consolidate_rel_l2 .*: expected a .*number >= 0"):
        make_weave(consolidate_rel_l2=value)


def test_cli_consolidation_flag_and_delta_spread_are_checked(capsys, tmp_path):
    for argv in (["verify", "--base", "b", "--adapter", "a=b", "--consolidate-rel-l2", "-1"],
                 ["serve", "b", "--consolidate-rel-l2", "x"],
                 ["make-tiny", str(tmp_path), "--delta-spread", "1:0.1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--consolidate-rel-l2: '-1': expected a number >= 0" in err
    assert "--consolidate-rel-l2: 'x': expected a number >= 0" in err
    assert "--delta-spread: '1:0.1': expected 0 < LO <= HI" in err


def test_cli_verify_prints_the_consolidation_report(spread, capsys):
    code = main(["verify", "--base", str(spread / "base"), "--adapters-dir", str(spread / "adapters"),
                 "--granularity", "64KiB", "--max-new-tokens", "4", "--consolidate-rel-l2", "0.05", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["consolidate_rel_l2"] == 0.05 and report["memory"]["saved_bytes"] > 0
    assert all(0 <= row["agreement"] <= 1 for row in report["adapters"].values())


def test_two_loads_of_the_same_expert_prepared_at_once_keep_the_index_whole(make_weave, tiny):
    """The engine thread's load runs while the loader thread's copies of the same experts are in flight:
    both hold their own copies; unloading both leaves nothing indexed, mapped or taken."""
    law = tiny / "adapters" / "law"
    weave = make_weave()
    copy_experts, nested = weave._copy_experts, []

    def copy_and_interleave(*args):
        copy_experts(*args)
        if not nested:
            nested.append(None)
            nested[0] = weave.publish(weave.prepare("law-copy", weave.pack(law)))

    weave._copy_experts = copy_and_interleave
    first = weave.publish(weave.prepare("law", weave.pack(law)))
    assert nested[0].slots != first.slots, "neither saw the other's slots indexed: each holds a copy"
    weave.load_adapter("law-3", law)  # shares one of the two copies
    for name in ("law", "law-copy", "law-3"):
        weave.unload_adapter(name)
    assert adapter_mapped(weave) == 0 and not weave._index.by_position and not weave._index.of_slot
    assert weave.tables.free_rows == list(range(1, weave.config.max_adapters + 1))


def test_a_load_not_yet_published_is_in_no_report(make_weave, tiny):
    law = tiny / "adapters" / "law"
    weave = make_weave()
    weave.load_adapter("law", law)
    before = weave.memory_report()
    pending = weave.prepare("law-copy", weave.pack(law))
    during = weave.memory_report()
    assert (during.adapter_slot_bytes, during.saved_bytes) == (before.adapter_slot_bytes, 0)
    assert during.adapters["law"].shared_slots == 0 and during.adapters["law"].saved_bytes == 0
    weave.publish(pending)
    assert weave.memory_report().saved_bytes == before.adapter_expert_bytes
