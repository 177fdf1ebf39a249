"""Virtual expert memory: the backend-generic suite on the host backend, plus host-only checks.

The suite (tests/memory_suite.py) runs once per factory in `backends`; other backends' test files
import memory_suite and run it with their own factories. What only the host backend can show (the
memfd, /proc) is checked here.
"""

import os
import random

import pytest
import torch

import memory_suite
from expertweave_ascend.errors import CapacityError, MemoryBackendError
from expertweave_ascend.memory import ExpertMemory, HostBackend
from expertweave_ascend.memory.slots import SlotAllocator

backends = [
    pytest.param(lambda: HostBackend(granularity=16 * 4096), id="host-64KiB"),
    pytest.param(lambda: HostBackend(granularity=2 << 20), id="host-2MiB"),
]


@pytest.fixture(params=backends)
def make_backend(request):
    """A factory of fresh backends, all closed after the test."""
    with memory_suite.closing_factory(request.param) as make:
        yield make


@pytest.mark.parametrize("check", memory_suite.CHECKS, ids=lambda check: check.__name__)
def test_memory_suite(check, make_backend):
    check(make_backend)


# ----------------------------------------------------------------------------------------------
# SlotAllocator

def test_slots_are_the_lowest_free_ones():
    slots = SlotAllocator(num_base=4, num_adapter_slots=6)
    assert slots.num_slots == 10
    assert slots.choose(3, "law") == [4, 5, 6]
    assert slots.choose(3, "law") == [4, 5, 6], "choose() must not take the slots"
    slots.take("law", [4, 5, 6])
    assert slots.choose(2, "math") == [7, 8]
    slots.take("math", [7, 8])
    assert slots.slots_of("law") == [4, 5, 6]
    assert slots.free_count == 1


def test_a_released_hole_is_filled_first():
    slots = SlotAllocator(num_base=2, num_adapter_slots=8)
    for owner, n in (("a", 2), ("b", 3), ("c", 1)):
        slots.take(owner, slots.choose(n, owner))
    assert slots.slots_of("b") == [4, 5, 6]
    assert slots.release("b") == [4, 5, 6]
    assert slots.slots_of("b") == []
    assert slots.choose(2, "d") == [4, 5]
    assert slots.choose(4, "d") == [4, 5, 6, 8]
    slots.take("d", [4, 5])
    assert slots.owners == [("a",), ("a",), ("d",), ("d",), None, ("c",), None, None]
    assert slots.release("nobody") == []


def test_a_shared_slot_is_free_only_after_its_last_owner_releases_it():
    slots = SlotAllocator(num_base=2, num_adapter_slots=4)
    slots.take("law", [2, 3])
    slots.share("law-v2", [3])
    assert slots.sharers(3) == 2 and slots.sharers(2) == 1
    assert slots.slots_of("law-v2") == [3]
    assert slots.release("law") == [2]
    assert slots.owners == [None, ("law-v2",), None, None]
    assert slots.release("law-v2") == [3]
    assert slots.free_count == 4


def test_slot_capacity_error_names_what_and_changes_nothing():
    slots = SlotAllocator(num_base=4, num_adapter_slots=3)
    slots.take("law", slots.choose(2, "law"))
    before = list(slots.owners)
    with pytest.raises(CapacityError, match="layer 7 needs 2 adapter slots, 1 of 3 are free"):
        slots.choose(2, "layer 7")
    assert slots.owners == before


# ----------------------------------------------------------------------------------------------
# host-only: the memfd and the kernel's view of the mappings

G = 16 * 4096


def memfd_ranges(backend: HostBackend) -> list[tuple[int, int]]:
    """(start, end) of every mapping of the backend's memfd, from /proc/self/maps."""
    inode = os.fstat(backend.fd).st_ino
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 5 and int(fields[4]) == inode and "memfd:" in line:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def maps_overlapping(start: int, end: int) -> list[str]:
    with open("/proc/self/maps") as maps:
        return [line for line in maps
                if (lambda a, b: a < end and start < b)(*(int(x, 16) for x in line.split()[0].split("-")))]


def mapped_granule_addresses(mem: ExpertMemory) -> set[int]:
    return {vt.address + gi * vt.granularity
            for layer in mem.tensors.values() for vt in layer.values() for gi in vt.mapped_granules}


@pytest.fixture
def host():
    backend = HostBackend(granularity=G)
    yield backend
    backend.close()


def test_granularity_must_be_a_page_multiple():
    with pytest.raises(MemoryBackendError, match="page size"):
        HostBackend(granularity=4096 + 512)
    with pytest.raises(MemoryBackendError):
        HostBackend(granularity=0)


def test_new_and_reused_handles_read_zero(host):
    address = host.reserve(G)
    view = host.tensor(address, (G,), torch.uint8)
    handle = host.create_physical(G)
    host.map(address, G, handle)
    assert not view.any()
    view.fill_(0xAB)
    host.unmap(address, G)
    host.free_physical(handle)

    reused = host.create_physical(G)  # the freed chunk comes back, with its hole punched
    host.map(address, G, reused)
    assert not view.any(), "a reused physical chunk still holds the previous owner's data"
    host.unmap(address, G)
    host.free_physical(reused)
    host.release(address, G)


def test_free_gives_the_pages_back(host):
    address = host.reserve(2 * G)
    before = host.physical_bytes_resident()
    handles = [host.create_physical(G) for _ in range(2)]
    for i, handle in enumerate(handles):
        host.map(address + i * G, G, handle)
    host.tensor(address, (2 * G,), torch.uint8).fill_(1)
    assert host.physical_bytes_resident() >= before + 2 * G
    host.unmap(address, G)
    assert host.physical_bytes_resident() >= before + 2 * G, "unmap alone must keep the handle's data"
    host.free_physical(handles[0])
    assert host.physical_bytes_resident() == before + G
    host.unmap(address + G, G)
    host.free_physical(handles[1])
    assert host.physical_bytes_resident() == before
    host.release(address, 2 * G)


def test_releasing_an_adapter_gives_its_pages_back(host):
    mem = ExpertMemory(host, memory_suite.memory_layers(G), 4, 8)
    vts = [vt for d in mem.tensors.values() for vt in d.values()]
    for vt in vts:  # touch every byte of the base's granules, including the one shared with slot M
        host.tensor(vt.address, (vt.mapped_bytes,), torch.uint8).fill_(1)
    assert host.physical_bytes_resident() == mem.base_mapped_bytes
    mem.allocate("law", {1: 3, 5: 2})
    for layer, slots in mem.slots_of("law").items():
        for t in mem.views(layer).values():
            t[slots].fill_(2)
    adapter_bytes = 3 * mem.expert_nbytes(1) + 2 * mem.expert_nbytes(5)
    assert host.physical_bytes_resident() >= mem.base_mapped_bytes + adapter_bytes - 4 * G
    mem.release("law")
    # the granules shared with base experts stay; everything else goes back to the kernel
    assert host.physical_bytes_resident() == mem.base_mapped_bytes
    for vt in vts:
        base = host.tensor(vt.address, (mem.num_base * vt.slot_nbytes,), torch.uint8)
        assert bool((base == 1).all())
    mem.close()


@pytest.mark.parametrize("granularity", [G, 2 << 20], ids=["64KiB", "2MiB"])
def test_proc_maps_show_exactly_the_mapped_granules(granularity):
    backend = HostBackend(granularity=granularity)
    try:
        mem = ExpertMemory(backend, memory_suite.memory_layers(granularity), 4, 12)
        rng = random.Random(3)
        owners = [f"a{i}" for i in range(5)]
        for step in range(30):
            owner = rng.choice(owners)
            if mem.slots_of(owner):
                mem.release(owner)
            else:
                try:
                    mem.allocate(owner, {layer: rng.randint(0, 3) for layer in mem.tensors})
                except CapacityError:
                    pass
            ranges = memfd_ranges(backend)
            assert sum(end - start for start, end in ranges) == mem.mapped_bytes
            kernel = {a for start, end in ranges for a in range(start, end, granularity)}
            assert kernel == mapped_granule_addresses(mem)
        for owner in owners:
            mem.release(owner)
        assert sum(end - start for start, end in memfd_ranges(backend)) == mem.base_mapped_bytes
    finally:
        backend.close()


def test_close_gives_back_the_fd_and_every_mapping():
    fds_before = len(os.listdir("/proc/self/fd"))
    backend = HostBackend(granularity=G)
    inode = os.fstat(backend.fd).st_ino
    mem = ExpertMemory(backend, memory_suite.memory_layers(G), 4, 8)
    mem.allocate("law", {1: 2, 3: 1})
    reserved = [(vt.address, vt.address + vt.size) for d in mem.tensors.values() for vt in d.values()]
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    backend.close()  # with adapters still mapped: close unmaps and releases everything
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with open("/proc/self/maps") as maps:
        assert not [line for line in maps if "memfd:" in line and int(line.split()[4]) == inode]
    for start, end in reserved:
        assert maps_overlapping(start, end) == [], "a reservation is still in the address space"
    backend.close()  # twice is harmless
    assert len(os.listdir("/proc/self/fd")) == fds_before


def vm_flags_of_memfd(backend: HostBackend) -> list[set[str]]:
    """The VmFlags of every mapping of the backend's memfd, from /proc/self/smaps."""
    inode, flags, ours = os.fstat(backend.fd).st_ino, [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:
                ours = len(fields) >= 5 and "memfd:" in line and int(fields[4]) == inode
            elif ours and fields[0] == "VmFlags:":
                flags.append(set(fields[1:]))
    return flags


@pytest.mark.skipif(not os.path.exists("/sys/kernel/mm/transparent_hugepage"), reason="kernel without THP")
@pytest.mark.parametrize("granularity", [G, 2 << 20], ids=["64KiB", "2MiB"])
def test_huge_granules_ask_for_huge_pages(granularity):
    backend = HostBackend(granularity=granularity)
    try:
        mem = ExpertMemory(backend, memory_suite.memory_layers(granularity), 4, 8)
        mem.allocate("law", {1: 2, 3: 1})
        flags = vm_flags_of_memfd(backend)
        assert flags and all(("hg" in f) == (granularity == 2 << 20) for f in flags)
        mem.close()
    finally:
        backend.close()
