"""What a memory backend has reserved, allocated and mapped where: every backend keeps one, so misuse is
refused here, the same way on every device, before the device API is called.

The device APIs would not all refuse it themselves, or would refuse it differently: CUDA frees a mapped
handle at its last unmap instead of refusing the free, AscendCL's release and unmap take no size, and what
each runtime returns for a map over a mapping is its own. ExpertMemory's byte accounting (invariant I3)
needs each call to do exactly what it says or nothing.

Each check names the device call it guards (the backend passes its own call names) and the problem.
"""

from dataclasses import dataclass, field
from typing import Hashable

from ..errors import MemoryBackendError


@dataclass
class MappingLedger:
    granularity: int
    reservations: dict[int, int] = field(default_factory=dict)  # address -> size
    handles: dict[Hashable, int] = field(default_factory=dict)  # physical handle -> size
    mappings: dict[int, tuple[int, Hashable]] = field(default_factory=dict)  # address -> (size, handle)
    mapped_granules: set[int] = field(default_factory=set)  # every mapped granule's address: O(1) overlaps
    mapped_at: dict[Hashable, int] = field(default_factory=dict)  # handle -> address it is mapped at

    def check_size(self, call: str, size: int) -> None:
        if size <= 0 or size % self.granularity:
            raise MemoryBackendError(f"{call}: size {size} is not a positive multiple of the granularity "
                                     f"{self.granularity}")

    def _granules(self, address: int, size: int) -> range:
        return range(address, address + size, self.granularity)

    # reservations
    def reserved(self, address: int, size: int) -> None:
        self.reservations[address] = size

    def check_release(self, call: str, address: int, size: int) -> None:
        recorded = self.reservations.get(address)
        if recorded is None:
            raise MemoryBackendError(f"{call}: 0x{address:x}+{size} is not a reservation")
        if recorded != size:
            raise MemoryBackendError(f"{call}: 0x{address:x} was reserved with {recorded} bytes, not {size}")
        if any(a in self.mapped_granules for a in self._granules(address, size)):
            raise MemoryBackendError(f"{call}: 0x{address:x} still has memory mapped in it")

    def released(self, address: int) -> None:
        del self.reservations[address]

    # physical memory
    def created(self, handle: Hashable, size: int) -> None:
        self.handles[handle] = size

    def check_free(self, call: str, handle: Hashable) -> None:
        if handle not in self.handles:
            raise MemoryBackendError(f"{call}: {handle:#x} is not a live physical handle")
        if handle in self.mapped_at:
            raise MemoryBackendError(f"{call}: handle {handle:#x} is still mapped at 0x{self.mapped_at[handle]:x}; "
                                     "unmap it first")

    def freed(self, handle: Hashable) -> None:
        del self.handles[handle]

    # mappings
    def check_map(self, call: str, address: int, size: int, handle: Hashable) -> None:
        self.check_size(call, size)
        if address % self.granularity:
            raise MemoryBackendError(f"{call}: address 0x{address:x} is not a multiple of the granularity "
                                     f"{self.granularity}")
        if not any(a <= address and address + size <= a + n for a, n in self.reservations.items()):
            raise MemoryBackendError(f"{call}: 0x{address:x}+{size} is not inside one reservation")
        if handle not in self.handles:
            raise MemoryBackendError(f"{call}: {handle:#x} is not a live physical handle")
        if self.handles[handle] != size:
            raise MemoryBackendError(f"{call}: {size} bytes of physical handle {handle:#x}, which has "
                                     f"{self.handles[handle]}; a handle is mapped whole")
        if any(a in self.mapped_granules for a in self._granules(address, size)):
            raise MemoryBackendError(f"{call}: 0x{address:x}+{size} overlaps memory that is already mapped")
        if handle in self.mapped_at:
            raise MemoryBackendError(f"{call}: handle {handle:#x} is already mapped elsewhere "
                                     f"(at 0x{self.mapped_at[handle]:x})")

    def mapped(self, address: int, size: int, handle: Hashable) -> None:
        self.mappings[address] = (size, handle)
        self.mapped_granules.update(self._granules(address, size))
        self.mapped_at[handle] = address

    def check_unmap(self, call: str, address: int, size: int) -> None:
        if address not in self.mappings:
            raise MemoryBackendError(f"{call}: nothing is mapped at 0x{address:x}+{size}")
        recorded = self.mappings[address][0]
        if recorded != size:
            raise MemoryBackendError(f"{call}: 0x{address:x} was mapped with {recorded} bytes, not {size}")

    def unmapped(self, address: int) -> Hashable:
        size, handle = self.mappings.pop(address)
        self.mapped_granules.difference_update(self._granules(address, size))
        del self.mapped_at[handle]
        return handle
