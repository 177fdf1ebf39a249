"""One expert weight tensor of M + S slots over a reserved address range, mapped granule by granule.

Each granule counts the occupied slots that touch it: it is mapped when the count leaves 0 and
unmapped when it returns to 0, so two neighbouring experts of different owners share the granule
between them and memory follows occupancy exactly. The base experts, which stay until the tensor is
closed, are mapped as one run: one physical allocation and one map call, instead of one per granule.

A granule whose last slot is freed may stay mapped, warm, while the pool's warm budget allows: the next
adapter whose slots touch it is written into memory that is already mapped and touched, which on the
host backend saves a page fault per 4 KiB page (most of a hot load's time) and on devices the map calls.
"""

import torch

from .backend import MemoryBackend
from .pool import PhysicalPool


class VirtualExpertTensor:
    def __init__(self, backend: MemoryBackend, pool: PhysicalPool, num_slots: int,
                 slot_shape: tuple[int, ...], dtype: torch.dtype):
        self.backend = backend
        self.pool = pool
        self.granularity = g = backend.granularity
        self.slot_nbytes = dtype.itemsize
        for d in slot_shape:
            self.slot_nbytes *= d
        self.size = -(-num_slots * self.slot_nbytes // g) * g
        self.address = backend.reserve(self.size)
        self.refs = [0] * (self.size // g)
        self.handles: dict[int, object] = {}  # granule index -> physical handle of that one granule
        self.warm: set[int] = set()  # granules in handles that no slot occupies (kept under pool.warm_budget)
        self.fixed_granules = 0  # granules 0.. mapped as one run for the first slots (map_fixed)
        self.fixed_handle = None
        self.tensor = backend.tensor(self.address, (num_slots, *slot_shape), dtype)

    def granules(self, slot: int) -> range:
        start = slot * self.slot_nbytes
        return range(start // self.granularity, -(-(start + self.slot_nbytes) // self.granularity))

    def new_granules(self, slots: list[int]) -> int:
        """How many granules mapping these slots would add (warm ones are already mapped)."""
        touched = {gi for s in slots for gi in self.granules(s)}
        return sum(1 for gi in touched if self.refs[gi] == 0 and gi not in self.warm)

    def map_fixed(self, count: int) -> None:
        """Maps slots 0..count-1, which stay until close, with one allocation and one map call."""
        assert not self.handles and not self.fixed_granules, "map_fixed comes first"
        granules = self.granules(count - 1).stop
        handle = self.pool.allocate(granules)
        try:
            self.backend.map(self.address, granules * self.granularity, handle)
        except BaseException:
            self.pool.free(handle, granules)
            raise
        self.fixed_granules, self.fixed_handle = granules, handle
        for slot in range(count):
            for gi in self.granules(slot):
                self.refs[gi] += 1

    @property
    def mapped_granules(self) -> set[int]:
        return set(range(self.fixed_granules)) | set(self.handles)

    def map_slots(self, slots: list[int]) -> None:
        """Maps every granule under these slots; all or nothing."""
        touched = {gi for s in slots for gi in self.granules(s) if self.refs[gi] == 0}
        fresh = sorted(touched - self.warm)
        mapped: list[int] = []
        try:
            for gi in fresh:
                handle = self.pool.allocate()
                try:
                    self.backend.map(self.address + gi * self.granularity, self.granularity, handle)
                except BaseException:
                    self.pool.free(handle)
                    raise
                self.handles[gi] = handle
                mapped.append(gi)
        except BaseException:
            for gi in mapped:
                self.backend.unmap(self.address + gi * self.granularity, self.granularity)
                self.pool.free(self.handles.pop(gi))
            raise
        for gi in touched & self.warm:
            self.warm.discard(gi)
            self.pool.warm_bytes -= self.granularity
        for slot in slots:
            for gi in self.granules(slot):
                self.refs[gi] += 1

    def unmap_slots(self, slots: list[int]) -> None:
        for slot in slots:
            for gi in self.granules(slot):
                self._drop(gi)

    def _drop(self, gi: int) -> None:
        self.refs[gi] -= 1
        assert self.refs[gi] or gi >= self.fixed_granules, f"granule {gi} of the fixed run lost its last slot"
        if self.refs[gi] == 0:
            if self.pool.keep_warm():
                self.warm.add(gi)
            else:
                self._unmap(gi)

    def _unmap(self, gi: int) -> None:
        handle = self.handles.pop(gi)
        self.backend.unmap(self.address + gi * self.granularity, self.granularity)
        self.pool.free(handle)

    def cool(self, nbytes: int) -> int:
        """Unmaps warm granules until nbytes are freed or none is left; returns the bytes freed."""
        freed = 0
        while self.warm and freed < nbytes:
            self._unmap(self.warm.pop())
            self.pool.warm_bytes -= self.granularity
            freed += self.granularity
        return freed

    @property
    def mapped_bytes(self) -> int:
        return (len(self.handles) + self.fixed_granules) * self.granularity

    def close(self) -> None:
        self.pool.warm_bytes -= len(self.warm) * self.granularity
        self.warm.clear()
        for gi in list(self.handles):
            self._unmap(gi)
        if self.fixed_granules:
            self.backend.unmap(self.address, self.fixed_granules * self.granularity)
            self.pool.free(self.fixed_handle, self.fixed_granules)
            self.fixed_granules, self.fixed_handle = 0, None
        self.backend.release(self.address, self.size)
