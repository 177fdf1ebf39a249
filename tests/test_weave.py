"""ExpertWeave core over the transformers reference integration: invariants I1, I2, I3, I5 and churn."""

import os
import random
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.errors import AdapterError, AdapterStateError, CapacityError
from expertweave_ascend.integrations.hf import load_model, moe_layer_handles
from expertweave_ascend.packed import PackedAdapter
from expertweave_ascend.weave import ExpertWeave, WeaveConfig

GRANULE = 64 << 10


def snapshot(weave: ExpertWeave) -> dict:
    return {"tables": weave.tables.tensor.clone(), "mapped": weave.memory.mapped_bytes,
            "pool": weave.memory.pool.used_bytes, "adapters": sorted(weave.adapters),
            "free_rows": list(weave.tables.free_rows),
            "slots": {layer: list(s.owners) for layer, s in weave.memory.slots.items()}}


def assert_unchanged(weave: ExpertWeave, before: dict) -> None:
    after = snapshot(weave)
    assert torch.equal(after.pop("tables"), before.pop("tables"))
    assert after == before


def memfd_mapped_bytes(weave: ExpertWeave) -> int:
    """Bytes the kernel shows mapped from this weave's memfd arena."""
    total = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            if f"memfd:{weave.backend.name} " in line:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                total += end - start
    return total


def test_load_writes_packed_experts_and_routes_to_them(make_weave, tiny):
    weave = make_weave()
    loaded = weave.load_adapter("law", tiny / "adapters" / "law")
    adapter = EsftAdapter.open(tiny / "adapters" / "law")
    handles = {h.layer: h for h in weave.layers}
    with adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            table = weave.tables.layer(layer)
            views = weave.memory.views(layer)
            for expert in range(weave.base.num_experts):
                slot = int(table[loaded.row, expert])
                if expert in ids:
                    assert slot >= weave.base.num_experts
                    packed = handles[layer].pack_expert(*read(layer, expert))
                    assert torch.equal(views["w13"][slot], packed["w13"])
                    assert torch.equal(views["w2"][slot], packed["w2"])
                else:
                    assert slot == expert
    assert torch.equal(weave.tables.tensor[:, 0], torch.arange(16, dtype=torch.int32).expand(3, 16))


def test_a_load_from_the_files_fills_the_slots_the_packed_copy_would(make_weave, tiny, adapter_copy, monkeypatch):
    """load_adapter reads each expert straight into its slot, with no packed copy on the host: the same slots,
    bytes, rows, mapped memory and identity as publishing prepare(pack()). An expert a resident adapter
    holds, or files read with reused digests that change while read, make it prepare the packed copy instead,
    read with every check."""
    direct, packed = make_weave(), make_weave()
    packs = []
    pack = ExpertWeave.pack
    monkeypatch.setattr(ExpertWeave, "pack", lambda weave, path: packs.append(path) or pack(weave, path))
    for name in ("law", "math"):
        a = direct.load_adapter(name, tiny / "adapters" / name)
        b = packed.publish(packed.prepare(name, pack(packed, tiny / "adapters" / name)))
        assert (a.row, a.slots, a.sha256, a.nbytes) == (b.row, b.slots, b.sha256, b.nbytes)
    assert not packs, "a load no host tier keeps packed the adapter on the host"
    assert torch.equal(direct.tables.tensor, packed.tables.tensor)
    assert direct.memory.mapped_bytes == packed.memory.mapped_bytes
    for name, loaded in direct.adapters.items():  # only mapped slots may be read
        for layer, slots in loaded.slots.items():
            for weight, view in direct.memory.views(layer).items():
                assert torch.equal(view[slots], packed.memory.views(layer)[weight][slots])

    copy = direct.load_adapter("law-copy", adapter_copy("law"))
    assert len(packs) == 1 and copy.slots == direct.adapters["law"].slots  # shared, as prepare places it

    code = adapter_copy("code")
    direct.load_adapter("code", code)
    direct.unload_adapter("code")  # its files' digests are kept: the next read reuses them
    changing = [True]
    unchanged = PackedAdapter.unchanged
    monkeypatch.setattr(PackedAdapter, "unchanged", lambda p: unchanged(p) and not (changing and changing.pop()))
    loaded = direct.load_adapter("code", code)
    assert packs[-1] == code and not changing
    assert loaded.sha256 == packed.publish(packed.prepare("code", pack(packed, tiny / "adapters" / "code"))).sha256


def test_memory_report_counts_exact_bytes(make_weave, tiny):
    weave = make_weave()
    expert_bytes = (2 * 64 * 128 + 128 * 64) * 4  # float32 engine layout
    total = 0
    for name in ("law", "math", "code"):
        total += weave.load_adapter(name, tiny / "adapters" / name).num_experts
    report = weave.memory_report(model_bytes=1000)
    assert report.adapter_expert_bytes == total * expert_bytes
    assert report.base_expert_bytes == 3 * 16 * expert_bytes
    assert report.adapter_mapped_bytes == weave.memory.mapped_bytes - weave.memory.base_mapped_bytes
    assert report.adapter_mapped_bytes == memfd_mapped_bytes(weave) - report.base_mapped_bytes
    # Adapters are packed back to back after the base, so the only waste is the last granule of each tensor.
    assert report.adapter_expert_bytes <= report.adapter_mapped_bytes < report.adapter_expert_bytes + 6 * GRANULE
    assert report.padded_bytes == 3 * 8 * 3 * expert_bytes  # each adapter tunes 8 experts in its widest layer
    assert report.merged_bytes == 3000
    assert set(report.adapters) == {"law", "math", "code"}


def test_unload_restores_base_memory_and_tables(make_weave, tiny):
    weave = make_weave()
    before = snapshot(weave)
    for name in ("law", "math", "code"):
        weave.load_adapter(name, tiny / "adapters" / name)
    assert weave.memory.mapped_bytes > before["mapped"]
    for name in ("math", "law", "code"):
        weave.unload_adapter(name)
    assert_unchanged(weave, before)
    assert memfd_mapped_bytes(weave) == weave.memory.base_mapped_bytes


def test_i1_rows_written_only_after_slots_written(make_weave, tiny, monkeypatch):
    weave = make_weave()
    handles = {h.layer: h for h in weave.layers}
    adapter = EsftAdapter.open(tiny / "adapters" / "math")
    original = weave.tables.write_row
    checked = []

    def write_row(row, slots):
        assert "math" not in weave.adapters, "name published before its row was written"
        with adapter.reading() as read:
            for layer, mapping in slots.items():
                for expert, slot in mapping.items():
                    packed = handles[layer].pack_expert(*read(layer, expert))
                    assert torch.equal(weave.memory.views(layer)["w13"][slot], packed["w13"])
                    checked.append(slot)
        original(row, slots)

    monkeypatch.setattr(weave.tables, "write_row", write_row)
    weave.load_adapter("math", tiny / "adapters" / "math")
    assert len(checked) == adapter.num_experts
    assert weave.begin_request("math") == weave.adapters["math"].row


def test_i1_row_cleared_before_slots_unmapped(make_weave, tiny, monkeypatch):
    weave = make_weave()
    loaded = weave.load_adapter("code", tiny / "adapters" / "code")
    unmapped = []
    backend_unmap = weave.backend.unmap

    def unmap(address, size):
        row = weave.tables.tensor[:, loaded.row]
        assert torch.equal(row, torch.arange(16, dtype=torch.int32).expand_as(row)), "row still routes to slots"
        unmapped.append(address)
        backend_unmap(address, size)

    monkeypatch.setattr(weave.backend, "unmap", unmap)
    weave.unload_adapter("code")
    assert unmapped


def test_i2_unload_waits_for_requests_in_flight(make_weave, tiny):
    weave = make_weave()
    weave.load_adapter("law", tiny / "adapters" / "law")
    weave.begin_request("law")
    done = threading.Event()
    worker = threading.Thread(target=lambda: (weave.unload_adapter("law"), done.set()))
    worker.start()
    assert not done.wait(0.3), "unload did not wait for the running request"
    with pytest.raises(AdapterStateError, match="being unloaded"):
        weave.begin_request("law")
    assert "law" in weave.adapters and weave.memory.slots_of("law")
    weave.end_request("law")
    worker.join(5)
    assert done.is_set() and "law" not in weave.adapters and not weave.memory.slots_of("law")


def test_i2_unload_timeout_leaves_adapter_serving(make_weave, tiny):
    weave = make_weave()
    weave.load_adapter("law", tiny / "adapters" / "law")
    row = weave.begin_request("law")
    with pytest.raises(AdapterStateError, match="in flight"):
        weave.unload_adapter("law", timeout=0.1)
    assert weave.begin_request("law") == row
    weave.end_request("law")
    weave.end_request("law")
    weave.unload_adapter("law", timeout=1)


def test_unknown_and_duplicate_names(make_weave, tiny):
    weave = make_weave()
    with pytest.raises(AdapterStateError, match="unknown adapter 'nope'"):
        weave.begin_request("nope")
    with pytest.raises(AdapterStateError, match="unknown adapter"):
        weave.unload_adapter("nope")
    weave.load_adapter("law", tiny / "adapters" / "law")
    before = snapshot(weave)
    with pytest.raises(AdapterStateError, match="already loaded"):
        weave.load_adapter("law", tiny / "adapters" / "math")
    assert_unchanged(weave, before)
    assert weave.begin_request(None) == 0


def test_i5_invalid_adapter_changes_nothing(make_weave, tiny, adapter_copy):
    weave = make_weave()
    weave.load_adapter("math", tiny / "adapters" / "math")
    bad = adapter_copy("law")
    (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-10])
    before = snapshot(weave)
    with pytest.raises(AdapterError, match="model.safetensors: not a valid safetensors file"):
        weave.load_adapter("law", bad)
    assert_unchanged(weave, before)


def test_files_read_and_checked_before_are_not_hashed_again_while_unchanged(make_weave, adapter_copy, monkeypatch):
    """A second pack of the same versions of the files reuses their digests (the same identity, the same
    bytes packed); rewritten with a NaN, the files are read, hashed and refused again; files whose identity
    changes during a read that reused digests are read again, with every check."""
    from expertweave_ascend.adapters import esft

    hashed = []
    sha256 = esft._sha256
    monkeypatch.setattr(esft, "_sha256", lambda tensor: hashed.append(1) or sha256(tensor))
    weave = make_weave()
    path = adapter_copy("law")
    first = weave.pack(path)
    assert hashed and first.unchanged()
    hashed.clear()
    again = weave.pack(path)
    assert not hashed, "unchanged files were hashed again"
    assert again.sha256 == first.sha256 and again.expert_sha256 == first.expert_sha256
    assert all(torch.equal(again.weights[l][w], first.weights[l][w]) for l in first.weights for w in first.weights[l])

    changing = [True]  # the files look changed once, after a read that reused their digests
    unchanged = PackedAdapter.unchanged
    monkeypatch.setattr(PackedAdapter, "unchanged",
                        lambda packed: unchanged(packed) and not (changing and changing.pop()))
    assert weave.pack(path).sha256 == first.sha256 and hashed, "the read after the change was not checked"

    tensors = load_file(path / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=f"tensor {key} holds NaN or infinite values"):
        weave.pack(path)


def test_i5_non_finite_weights_are_refused_and_change_nothing(make_weave, tiny, adapter_copy):
    weave = make_weave()
    weave.load_adapter("math", tiny / "adapters" / "math")
    bad = adapter_copy("law")
    tensors = load_file(bad / "model.safetensors")
    key = sorted(tensors)[-1]  # the last tensor read, so every other expert was already written
    tensors[key][3, 5] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    before = snapshot(weave)
    with pytest.raises(AdapterError) as excinfo:
        weave.load_adapter("law", bad)
    assert str(excinfo.value) == f"{bad / 'model.safetensors'}: tensor {key} holds NaN or infinite values"
    assert_unchanged(weave, before)


def test_identity_is_the_content_not_the_name_or_path(make_weave, tiny, adapter_copy):
    weave = make_weave()
    law = weave.load_adapter("law", tiny / "adapters" / "law")
    same = weave.load_adapter("law-copy", adapter_copy("law"))
    math = weave.load_adapter("math", tiny / "adapters" / "math")
    assert len(law.sha256) == 64 and law.sha256 == same.sha256 != math.sha256
    changed = adapter_copy("law")
    tensors = load_file(changed / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] += 1
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    weave.unload_adapter("law")
    assert weave.load_adapter("law", changed).sha256 not in (law.sha256, math.sha256)
    report = weave.memory_report()
    assert report.adapters["math"].sha256 == math.sha256 and report.adapters["law-copy"].sha256 == law.sha256


def test_i5_failure_while_writing_rolls_back(make_weave, tiny, monkeypatch):
    weave = make_weave()
    before = snapshot(weave)
    handle = weave.layers[-1]
    monkeypatch.setattr(handle, "pack_expert", lambda *w: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        weave.load_adapter("law", tiny / "adapters" / "law")
    assert_unchanged(weave, before)


def test_i5_capacity_errors_change_nothing(make_weave, tiny):
    weave = make_weave(max_adapters=1, adapter_memory_bytes=2 << 20)
    weave.load_adapter("law", tiny / "adapters" / "law")
    before = snapshot(weave)
    with pytest.raises(CapacityError, match="adapter rows are in use"):
        weave.load_adapter("math", tiny / "adapters" / "math")
    assert_unchanged(weave, before)

    tight = make_weave(adapter_memory_bytes=4 * GRANULE)
    before = snapshot(tight)
    with pytest.raises(CapacityError, match="MiB more physical memory"):
        tight.load_adapter("math", tiny / "adapters" / "math")
    assert_unchanged(tight, before)

    narrow = make_weave(adapter_slots=4)
    before = snapshot(narrow)
    with pytest.raises(CapacityError, match="layer 2 needs 8 adapter slots, 4 of 4 are free"):
        narrow.load_adapter("law", tiny / "adapters" / "law")
    assert_unchanged(narrow, before)


def test_500_load_unload_cycles_leak_nothing(tiny, geometry):
    fds_before = len(os.listdir("/proc/self/fd"))
    model = load_model(tiny / "base")
    handles, _ = moe_layer_handles(model)
    weave = ExpertWeave(geometry, handles, WeaveConfig(max_adapters=6, adapter_slots=48, granularity=GRANULE))
    base_mapped = weave.memory.base_mapped_bytes
    rng = random.Random(7)
    sources = ["law", "math", "code"]
    loaded: dict[str, str] = {}
    for cycle in range(500):
        if loaded and (len(loaded) == 6 or rng.random() < 0.5):
            weave.unload_adapter(rng.choice(sorted(loaded)))
        else:
            name = f"a{cycle}"
            weave.load_adapter(name, tiny / "adapters" / rng.choice(sources))
            loaded[name] = name
        loaded = {n: n for n in weave.adapters}
        assert memfd_mapped_bytes(weave) == weave.memory.mapped_bytes
    for name in list(weave.adapters):
        weave.unload_adapter(name)
    assert weave.memory.mapped_bytes == base_mapped
    assert memfd_mapped_bytes(weave) == base_mapped
    assert all(ref == 0 for layer in weave.memory.tensors.values() for vt in layer.values()
               for gi, ref in enumerate(vt.refs) if gi * GRANULE >= 16 * vt.slot_nbytes + GRANULE)
    weave.close()
    assert memfd_mapped_bytes(weave) == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before
