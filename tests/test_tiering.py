"""The tiering core without an engine: the catalogue, residency and its eviction policies, the host
tier, and loads on the loader thread over the transformers reference integration (real files, real
virtual memory): what a background load publishes equals a load on the caller's thread."""

import os
import random
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from expertweave_ascend.catalogue import AdapterCatalogue
from expertweave_ascend.errors import AdapterStateError, ConfinementError
from expertweave_ascend.host_tier import HostTier
from expertweave_ascend.integrations.hf import load_model, moe_layer_handles
from expertweave_ascend.loader import BackgroundLoader, LoadAnswer
from expertweave_ascend.residency import EVICTING, LOADING, RESIDENT, UNLOADING, Residency
from expertweave_ascend.weave import ExpertWeave, WeaveConfig

GRANULE = 64 << 10


# -- catalogue --------------------------------------------------------------------------------------
def test_the_catalogue_names_every_adapter_directory_and_the_named_entries(tiny, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny / "adapters", root)
    (root / "notes").mkdir()  # no expert_cfg.json: not an adapter
    (root / ".hidden").mkdir()
    shutil.copy(root / "law" / "expert_cfg.json", root / ".hidden")
    catalogue = AdapterCatalogue(root, {"legal": tiny / "adapters" / "law"})
    assert catalogue.names() == ["code", "law", "legal", "math"]
    assert catalogue.path("law") == (root / "law").resolve()
    assert catalogue.path("legal") == tiny / "adapters" / "law"
    for name in ("notes", ".hidden", "../root/law", "law/..", "", "missing"):
        assert catalogue.path(name) is None, name


def test_a_catalogued_directory_leading_outside_the_root_is_refused(tiny, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tiny / "adapters" / "law", root / "law")
    with pytest.raises(ConfinementError, match="outside the adapter root"):
        AdapterCatalogue(root).path("law")


# -- residency --------------------------------------------------------------------------------------
def test_lru_evicts_the_least_recently_used_idle_adapter_and_never_one_in_use():
    residency = Residency(3, "lru")
    for name in ("a", "b", "c"):
        residency.add_resident(name, name)
    for t, name in enumerate(["a", "b", "c"]):
        residency.lease(name, now=float(t))
        residency.release(name)
    assert not residency.has_room()
    assert residency.victim(now=10.0) == "a"
    residency.lease("a", now=11.0)  # a request in flight or queued: never evicted (I2)
    assert residency.victim(now=12.0) == "b"
    residency.use("b").waiting = 1
    residency.use("c").pinned = True
    assert residency.victim(now=12.0) is None
    residency.use("b").waiting = 0
    assert residency.begin_leave("b", EVICTING)
    assert residency.victim(now=12.0) is None and not residency.serving("b")


def test_demand_keeps_the_often_used_adapter_that_lru_would_evict():
    lru, demand = Residency(2, "lru"), Residency(2, "demand")
    for residency in (lru, demand):
        for name in ("popular", "rare"):
            residency.add_resident(name, name)
        for t in range(10):
            residency.lease("popular", now=float(t))
            residency.release("popular")
        residency.lease("rare", now=10.0)
        residency.release("rare")
    assert lru.victim(now=11.0) == "popular"
    assert demand.victim(now=11.0) == "rare"
    for t in range(5):  # much later, rare is the one in demand: popular's old demand has decayed
        demand.lease("rare", now=500.0 + t)
        demand.release("rare")
    assert demand.victim(now=505.0) == "popular"


def check_residency(residency: Residency, names) -> None:
    on_device = {n for n, state in residency.states.items() if state in (RESIDENT, EVICTING, UNLOADING)}
    assert set(residency.entries) == on_device, "every adapter on the device has its one entry, and only those"
    rows = [n for n, state in residency.states.items() if state != EVICTING]
    assert len(rows) <= residency.max_resident, "rows double-booked"
    for name in names:
        use = residency.use(name)
        assert use.leases >= 0 and use.waiting >= 0
        if residency.states.get(name) == EVICTING:
            assert use.leases == 0, "an adapter with a request is never evicted (I2)"
        if use.pinned:
            assert name in on_device, "only an adapter on the device is pinned"
    victim = residency.victim()
    if victim is not None:
        use = residency.use(victim)
        assert residency.serving(victim) and not use.leases and not use.waiting and not use.pinned


def test_residency_stays_consistent_under_random_interleavings_with_failures_at_every_step(capsys):
    """The catalogue's state machine (residency.py) driven as the server drives it, through loads, evictions,
    unloads by hand, leases and waits in random order, each load or leave failing at random: after every step
    each adapter is in one state with its one entry, no row is double-booked, nothing in use is evicted, and
    a transition from the wrong state raises and changes nothing. At the end, with the in-flight work ended,
    nothing is stuck and every adapter can be loaded again. (On 0071847 an unload racing an eviction of the
    same adapter left its name among those being evicted: every catalogued adapter then waited for a row.)"""
    rng = random.Random(29)
    names = [f"a{i}" for i in range(6)]
    steps = 0
    for run in range(40):
        residency = Residency(3, rng.choice(["lru", "demand"]))
        leases: list[str] = []
        victims: dict[str, str] = {}  # a load -> the adapter its start evicts
        for _ in range(150):
            name = rng.choice(names)
            state = residency.states.get(name)
            action = rng.choice(["load", "load", "end_load", "unload", "end_leave", "evict", "lease", "release",
                                 "wait", "stop_waiting", "hand", "illegal"])
            evicting_alone = {n for n, s in residency.states.items() if s == EVICTING} - set(victims.values())
            if action == "load" and state is None and not evicting_alone:  # _take_room, under the room lock
                victim = None if residency.has_room() else residency.victim()
                if residency.has_room() or victim is not None:
                    if victim is not None:
                        assert residency.begin_leave(victim, EVICTING)
                        victims[name] = victim
                    residency.begin_load(name)
            elif action == "end_load" and state == LOADING:
                ok = rng.random() < 0.7
                victim = victims.pop(name, None)
                if ok and residency.states.get(victim) == EVICTING:  # a load ends after its start evicted
                    residency.end_leave(victim, left=True)
                residency.end_load(name, f"{name}@{run}" if ok else None)
                if residency.states.get(victim) == EVICTING:  # then its eviction is finished, or called off
                    residency.end_leave(victim, left=rng.random() < 0.7)
            elif action == "evict" and not evicting_alone and (victim := residency.victim()) is not None:
                assert residency.begin_leave(victim, EVICTING)  # the capacity path, under the room lock
            elif action == "hand" and state is None and residency.has_free_row():  # a load by hand: pinned
                residency.begin_load(name)
                residency.end_load(name, f"{name}@hand")
                residency.use(name).pinned = True
            elif action == "unload":
                assert residency.begin_leave(name, UNLOADING) == (state == RESIDENT)
            elif action == "end_leave" and state in (EVICTING, UNLOADING):
                left = rng.random() < 0.7
                if not left and state == EVICTING and not residency.has_room():
                    with pytest.raises(RuntimeError, match="its row went to a load still running"):
                        residency.end_leave(name, left)
                    took = next(load for load, victim in victims.items() if victim == name)
                    residency.end_load(took, None)  # the server ends the load that took the row first
                    del victims[took]
                residency.end_leave(name, left)
            elif action == "lease" and residency.serving(name):
                residency.lease(name)
                leases.append(name)
            elif action == "release" and leases:
                residency.release(leases.pop(rng.randrange(len(leases))))
            elif action == "wait":
                residency.use(name).waiting += 1
            elif action == "stop_waiting" and residency.use(name).waiting:
                residency.use(name).waiting -= 1
            elif action == "illegal":
                before = (dict(residency.states), dict(residency.entries))
                wrong = rng.choice([lambda: residency.begin_load(name) if state is not None else None,
                                    lambda: residency.end_load(name, "x") if state != LOADING else None,
                                    lambda: residency.end_leave(name, True) if state not in (EVICTING, UNLOADING)
                                    else None])
                try:
                    wrong()
                except RuntimeError:
                    pass
                assert (residency.states, residency.entries) == before
            check_residency(residency, names)
            steps += 1
        for name, state in list(residency.states.items()):  # the in-flight work ends, one way or the other
            if state == LOADING:
                residency.end_load(name, None)
            elif state in (EVICTING, UNLOADING):
                residency.end_leave(name, left=True)
        while leases:
            residency.release(leases.pop())
        for name in names:
            residency.use(name).waiting = 0
            residency.use(name).pinned = False
        assert set(residency.states.values()) <= {RESIDENT}, "nothing is stuck on its way in or out"
        for name in names:
            if residency.states.get(name) is None:
                victim = None if residency.has_room() else residency.victim()
                assert residency.has_room() or victim is not None, "an idle device always has a row to give"
                if victim is not None:
                    assert residency.begin_leave(victim, EVICTING)
                    residency.end_leave(victim, left=True)
                residency.begin_load(name)
                residency.end_load(name, name)
            check_residency(residency, names)
    with capsys.disabled():
        print(f"\nresidency interleavings: {steps} steps over 40 runs")


def test_an_unknown_policy_is_one_clear_error():
    with pytest.raises(ValueError, match="eviction policy 'mru': expected one of lru, demand"):
        Residency(2, "mru")


# -- host tier and loader ---------------------------------------------------------------------------
@pytest.fixture
def weave(tiny, geometry):
    handles, _ = moe_layer_handles(load_model(tiny / "base"))
    weave = ExpertWeave(geometry, handles, WeaveConfig(max_adapters=2, adapter_slots=32, granularity=GRANULE))
    yield weave
    weave.close()


def test_the_host_tier_keeps_the_most_recent_adapters_within_its_budget(weave, tiny, adapter_copy):
    law, math = weave.pack(tiny / "adapters" / "law"), weave.pack(tiny / "adapters" / "math")
    tier = HostTier(law.nbytes + math.nbytes)
    assert tier.put("law", law) and tier.put("math", math)
    assert tier.get("law", tiny / "adapters" / "law") is law
    code = weave.pack(tiny / "adapters" / "code")
    assert tier.put("code", code) == (code.nbytes <= tier.budget_bytes)
    assert "math" not in tier.names() and tier.resident_bytes <= tier.budget_bytes  # least recent went
    assert tier.get("law", tiny / "adapters" / "math") is None, "a name read from another path is another adapter"
    assert not HostTier(0).put("law", law)


def test_a_host_tier_copy_whose_files_changed_is_not_served(weave, adapter_copy):
    path = adapter_copy("law")
    tier = HostTier(1 << 30)
    tier.put("law", weave.pack(path))
    assert tier.get("law", path) is not None
    (path / "expert_cfg.json").write_text((path / "expert_cfg.json").read_text())  # same bytes, rewritten
    assert tier.get("law", path) is None and tier.names() == []


def collect_until(loader: BackgroundLoader, name: str) -> LoadAnswer:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done = loader.collect()
        if name in done:
            return done[name]
        time.sleep(0.01)
    raise AssertionError(f"{name} did not finish loading")


def test_a_background_load_publishes_what_a_direct_load_writes(weave, tiny, geometry):
    loader = BackgroundLoader(weave, HostTier(1 << 30))
    try:
        loader.start("law", tiny / "adapters" / "law")
        with pytest.raises(AdapterStateError, match="already being loaded"):
            loader.start("law", tiny / "adapters" / "law")
        answer = collect_until(loader, "law")
        assert answer.source == "disk" and "law" in weave.adapters and loader.loading() == []
        row, slots = answer.row, {int(l): s for l, s in answer.slots.items()}
        views = {layer: {n: v[s].clone() for n, v in weave.memory.views(layer).items()} for layer, s in slots.items()}
        table = weave.tables.tensor[:, row].clone()
        weave.unload_adapter("law")
        direct = weave.load_adapter("law", tiny / "adapters" / "law")
        assert direct.row == row and direct.slots == slots and direct.sha256 == answer.sha256
        assert torch.equal(weave.tables.tensor[:, row], table)
        for layer, s in slots.items():
            for n, v in weave.memory.views(layer).items():
                assert torch.equal(v[s], views[layer][n])
        weave.unload_adapter("law")
        loader.start("law", tiny / "adapters" / "law")
        assert collect_until(loader, "law").source == "host"  # packed once, in the host tier since
    finally:
        loader.close()


def test_a_load_the_host_tier_could_not_keep_goes_straight_into_the_slots(weave, tiny, monkeypatch):
    paths = {name: tiny / "adapters" / name for name in ("law", "math")}
    assert all(weave.packed_nbytes(p) == weave.pack(p).nbytes for p in paths.values())  # experts only
    small, big = sorted(paths, key=lambda name: weave.packed_nbytes(paths[name]))
    assert weave.packed_nbytes(paths[small]) < weave.packed_nbytes(paths[big])
    packs = []
    pack = ExpertWeave.pack
    monkeypatch.setattr(ExpertWeave, "pack", lambda w, path: packs.append(Path(path)) or pack(w, path))
    loader = BackgroundLoader(weave, HostTier(weave.packed_nbytes(paths[big]) - 1))
    try:
        loader.start(big, paths[big])
        answer = collect_until(loader, big)
        assert answer.error is None and answer.source == "disk" and answer.copy_s == 0.0
        assert not packs and loader.host_tier.names() == []
        loader.start(small, paths[small])
        assert collect_until(loader, small).error is None
        assert packs == [paths[small]] and loader.host_tier.names() == [small]  # it fits: packed and kept
    finally:
        loader.close()


def test_a_prefetched_adapter_loads_from_the_host_tier(weave, tiny):
    loader = BackgroundLoader(weave, HostTier(1 << 30))
    try:
        assert loader.prefetch("math", tiny / "adapters" / "math")
        assert not loader.prefetch("math", tiny / "adapters" / "math"), "already on its way"
        loader.start("math", tiny / "adapters" / "math")
        assert collect_until(loader, "math").source == "prefetch"
        assert not HostTier(0).names() and not BackgroundLoader(weave, HostTier(0)).prefetch("law", tiny / "adapters" / "law")
    finally:
        loader.close()


def test_a_failed_background_load_changes_nothing(weave, adapter_copy):
    bad = adapter_copy("law")
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    loader = BackgroundLoader(weave, HostTier(1 << 30))
    before = (weave.tables.tensor.clone(), weave.memory.mapped_bytes, list(weave.tables.free_rows))
    try:
        loader.start("bad", bad)
        answer = collect_until(loader, "bad")
        assert "model.safetensors" in answer.error and not answer.capacity
        assert "bad" not in weave.adapters and loader.host_tier.names() == []
        assert torch.equal(weave.tables.tensor, before[0])
        assert (weave.memory.mapped_bytes, list(weave.tables.free_rows)) == before[1:]
    finally:
        loader.close()


def test_a_load_without_slots_says_it_is_a_capacity_error(tiny, geometry):
    handles, _ = moe_layer_handles(load_model(tiny / "base"))
    weave = ExpertWeave(geometry, handles, WeaveConfig(max_adapters=2, adapter_slots=1, granularity=GRANULE))
    loader = BackgroundLoader(weave, HostTier(0))
    try:
        loader.start("law", tiny / "adapters" / "law")
        answer = collect_until(loader, "law")
        assert answer.capacity and "adapter slots" in answer.error
    finally:
        loader.close()
        weave.close()


def test_the_engine_thread_keeps_working_while_a_load_copies(weave, tiny):
    """A load never holds the weave while it reads and copies: requests of a resident adapter begin
    and end on this thread (as the engine's step loop does) while the loader thread is busy."""
    weave.load_adapter("code", tiny / "adapters" / "code")
    release = threading.Event()
    original = weave.pack

    def slow_pack(path):
        release.wait(30)
        return original(path)

    weave.pack = slow_pack
    loader = BackgroundLoader(weave, HostTier(0))
    try:
        loader.start("law", tiny / "adapters" / "law")
        for _ in range(100):
            weave.end_request("code") if weave.begin_request("code") else None
        assert loader.loading() == ["law"] and "law" not in weave.adapters
        release.set()
        assert collect_until(loader, "law").error is None
    finally:
        release.set()
        loader.close()


def test_warming_fills_only_the_free_room_of_the_host_tier_in_order(weave, tiny, adapter_copy):
    law, math = weave.pack(tiny / "adapters" / "law"), weave.pack(tiny / "adapters" / "math")
    bad = adapter_copy("code")
    (bad / "model.safetensors").write_bytes(b"not safetensors")
    tier = HostTier(law.nbytes + math.nbytes + 1)
    tier.put("kept", law)
    loader = BackgroundLoader(weave, tier)
    try:
        loader.warm([("bad", str(bad)), ("math", str(tiny / "adapters" / "math")),
                     ("law", str(tiny / "adapters" / "law")), ("code", str(tiny / "adapters" / "code"))])
        deadline = time.monotonic() + 30
        while "math" not in tier.names() and time.monotonic() < deadline:
            time.sleep(0.01)
        loader._prefetches.submit(lambda: None).result(30)  # the warming task has finished
    finally:
        loader.close()
    assert tier.names() == ["kept", "math"], "a bad adapter is skipped; warming stops at the first that does not fit"
