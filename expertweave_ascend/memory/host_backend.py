"""Host virtual memory: mmap(PROT_NONE) reservations, physical granules carved from one memfd.

Physical chunks are offsets in a memfd that grows as needed; freeing one punches a hole so the
pages really go back to the kernel. Mapping is mmap(MAP_FIXED | MAP_SHARED) of the chunk over the
reservation; unmapping puts a PROT_NONE mapping back so the range stays reserved. The backend
refuses what the device APIs refuse: unaligned sizes, mapping over a mapping, unmapping a hole,
releasing a range that is still mapped.
"""

import ctypes
import itertools
import mmap
import os

import torch

from ..errors import MemoryBackendError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE, _MAP_FIXED, _MAP_NORESERVE = 0x0, 0x10, 0x4000
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
DEFAULT_GRANULARITY = 2 << 20  # what CUDA and AscendCL report for device memory
_serial = itertools.count()


def _check_errno(ok: bool, call: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise MemoryBackendError(f"{call} failed: {os.strerror(err)}")


class HostBackend:
    def __init__(self, granularity: int = DEFAULT_GRANULARITY, name: str | None = None):
        if granularity <= 0 or granularity % mmap.PAGESIZE:
            raise MemoryBackendError(f"granularity {granularity} is not a positive multiple of the "
                                     f"page size {mmap.PAGESIZE}")
        self.granularity = granularity
        self.device = torch.device("cpu")
        # A name per backend, so /proc/<pid>/maps tells each arena's mappings apart.
        self.name = name or f"expertweave-{os.getpid()}-{next(_serial)}"
        self.fd = os.memfd_create(self.name, os.MFD_CLOEXEC)
        self._arena_size = 0
        self._free_offsets: list[int] = []
        self._live_handles: dict[int, int] = {}  # offset -> size
        self._reservations: dict[int, int] = {}  # address -> size
        self._mapped: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self._mapped_granules: set[int] = set()  # addresses of every mapped granule, for O(1) overlap checks
        self._mapped_handles: set[int] = set()

    def _check_size(self, size: int, what: str) -> None:
        if size <= 0 or size % self.granularity:
            raise MemoryBackendError(f"{what} size {size} is not a positive multiple of the "
                                     f"granularity {self.granularity}")

    def reserve(self, size: int) -> int:
        self._check_size(size, "reserve")
        # Over-reserve by one granule so the range can start on a granule boundary, as on devices.
        raw = _libc.mmap(None, size + self.granularity, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        _check_errno(raw not in (None, _MAP_FAILED), "mmap(reserve)")
        start = -(-raw // self.granularity) * self.granularity
        if start > raw:
            _libc.munmap(raw, start - raw)
        tail = raw + size + self.granularity - (start + size)
        if tail:
            _libc.munmap(start + size, tail)
        self._reservations[start] = size
        return start

    def _reservation_of(self, address: int, size: int) -> int:
        for start, length in self._reservations.items():
            if start <= address and address + size <= start + length:
                return start
        raise MemoryBackendError(f"range 0x{address:x}+{size} is not inside a reservation")

    def release(self, address: int, size: int) -> None:
        if self._reservations.get(address) != size:
            raise MemoryBackendError(f"release of 0x{address:x}+{size}: no such reservation")
        if any(address <= a < address + size for a in self._mapped_granules):
            raise MemoryBackendError(f"release of 0x{address:x}: the range is still mapped")
        _check_errno(_libc.munmap(address, size) == 0, "munmap(release)")
        del self._reservations[address]

    def create_physical(self, size: int) -> int:
        self._check_size(size, "physical memory")
        if size == self.granularity and self._free_offsets:
            offset = self._free_offsets.pop()
        else:  # larger chunks (a run of base experts) live until close, so they are not reused
            offset = self._arena_size
            self._arena_size += size
            os.ftruncate(self.fd, self._arena_size)
        self._live_handles[offset] = size
        return offset

    def free_physical(self, handle: int) -> None:
        if handle not in self._live_handles:
            raise MemoryBackendError(f"free of unknown physical handle {handle}")
        if handle in self._mapped_handles:
            raise MemoryBackendError(f"free of physical handle {handle} that is still mapped")
        size = self._live_handles.pop(handle)
        _check_errno(_libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                     handle, size) == 0, "fallocate(punch hole)")
        if size == self.granularity:
            self._free_offsets.append(handle)

    def map(self, address: int, size: int, handle: int) -> None:
        self._check_size(size, "map")
        if address % self.granularity:
            raise MemoryBackendError(f"map at 0x{address:x}: the address is not a multiple of the "
                                     f"granularity {self.granularity}")
        self._reservation_of(address, size)
        if handle not in self._live_handles:
            raise MemoryBackendError(f"map of unknown physical handle {handle}")
        if size != self._live_handles[handle]:
            raise MemoryBackendError(f"map of {size} bytes of physical handle {handle}, which has "
                                     f"{self._live_handles[handle]}")
        granules = range(address, address + size, self.granularity)
        if any(a in self._mapped_granules for a in granules):
            raise MemoryBackendError(f"map at 0x{address:x}: the range is already mapped")
        if handle in self._mapped_handles:
            raise MemoryBackendError(f"map of physical handle {handle}: it is already mapped elsewhere")
        got = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                         self.fd, handle)
        _check_errno(got == address, "mmap(map)")
        self._mapped[address] = (size, handle)
        self._mapped_granules.update(granules)
        self._mapped_handles.add(handle)

    def unmap(self, address: int, size: int) -> None:
        if self._mapped.get(address, (None,))[0] != size:
            raise MemoryBackendError(f"unmap at 0x{address:x}+{size}: nothing is mapped there")
        got = _libc.mmap(address, size, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
        _check_errno(got == address, "mmap(unmap)")
        _, handle = self._mapped.pop(address)
        self._mapped_granules.difference_update(range(address, address + size, self.granularity))
        self._mapped_handles.discard(handle)

    def synchronize(self) -> None:
        """CPU kernels have finished when they return: nothing is ever queued."""

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        buffer = (ctypes.c_ubyte * nbytes).from_address(address)
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)

    def physical_bytes_resident(self) -> int:
        """Bytes the kernel really holds for the arena (st_blocks), to check frees are real."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        for address, (size, _) in list(self._mapped.items()):
            self.unmap(address, size)
        for address, size in list(self._reservations.items()):
            self.release(address, size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
