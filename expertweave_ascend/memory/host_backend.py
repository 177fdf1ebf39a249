"""Host virtual memory: mmap(PROT_NONE) reservations, physical granules carved from one memfd.

Physical chunks are offsets in a memfd that grows as needed; freeing one punches a hole so the
pages really go back to the kernel. Mapping is mmap(MAP_FIXED | MAP_SHARED) of the chunk over the
reservation; unmapping puts a PROT_NONE mapping back so the range stays reserved. Misuse (unaligned
sizes, mapping over a mapping, unmapping a hole, releasing a range that is still mapped) is refused by
the ledger every backend keeps (ledger.py).
"""

import ctypes
import itertools
import math
import mmap
import os

import torch

from ..errors import MemoryBackendError
from .ledger import MappingLedger

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

_MAP_FAILED = ctypes.c_void_p(-1).value
_PROT_NONE, _MAP_FIXED, _MAP_NORESERVE = 0x0, 0x10, 0x4000
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
DEFAULT_GRANULARITY = 2 << 20  # what CUDA and AscendCL report for device memory
_HUGE_PAGE = 2 << 20
_serial = itertools.count()


def _check_errno(ok: bool, call: str) -> None:
    if not ok:
        err = ctypes.get_errno()
        raise MemoryBackendError(f"{call} failed: {os.strerror(err)}")


def host_bytes(address: int, nbytes: int) -> torch.Tensor:
    """A CPU tensor of nbytes bytes viewing host memory at address, without owning it."""
    buffer = (ctypes.c_ubyte * nbytes).from_address(address)
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)


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
        self.ledger = MappingLedger(granularity)

    def reserve(self, size: int) -> int:
        self.ledger.check_size("reserve", size)
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
        self.ledger.reserved(start, size)
        return start

    def release(self, address: int, size: int) -> None:
        self.ledger.check_release("release", address, size)
        _check_errno(_libc.munmap(address, size) == 0, "munmap(release)")
        self.ledger.released(address)

    def create_physical(self, size: int) -> int:
        self.ledger.check_size("create_physical", size)
        if size == self.granularity and self._free_offsets:
            offset = self._free_offsets.pop()
        else:  # larger chunks (a run of base experts) live until close, so they are not reused
            offset = self._arena_size
            self._arena_size += size
            os.ftruncate(self.fd, self._arena_size)
        self.ledger.created(offset, size)
        return offset

    def free_physical(self, handle: int) -> None:
        self.ledger.check_free("free_physical", handle)
        size = self.ledger.handles[handle]
        _check_errno(_libc.fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                     handle, size) == 0, "fallocate(punch hole)")
        self.ledger.freed(handle)
        if size == self.granularity:
            self._free_offsets.append(handle)

    def map(self, address: int, size: int, handle: int) -> None:
        self.ledger.check_map("map", address, size, handle)
        got = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED,
                         self.fd, handle)
        _check_errno(got == address, "mmap(map)")
        if size % _HUGE_PAGE == 0 and address % _HUGE_PAGE == 0 and handle % _HUGE_PAGE == 0:
            # Expert weights then take fewer TLB entries where the kernel gives shmem transparent huge
            # pages on request (shmem_enabled "advise"); a kernel without them refuses, which changes nothing.
            _libc.madvise(address, size, mmap.MADV_HUGEPAGE)
        self.ledger.mapped(address, size, handle)

    def unmap(self, address: int, size: int) -> None:
        self.ledger.check_unmap("unmap", address, size)
        got = _libc.mmap(address, size, _PROT_NONE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED | _MAP_NORESERVE, -1, 0)
        _check_errno(got == address, "mmap(unmap)")
        self.ledger.unmapped(address)

    def bind_thread(self) -> None:
        """Host memory belongs to no device."""

    def synchronize(self) -> None:
        """CPU kernels have finished when they return: nothing is ever queued."""

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return host_bytes(address, dtype.itemsize * math.prod(shape)).view(dtype).view(shape)

    def physical_bytes_resident(self) -> int:
        """Bytes the kernel really holds for the arena (st_blocks), to check frees are real."""
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        for address, (size, _) in list(self.ledger.mappings.items()):
            self.unmap(address, size)
        for address, size in list(self.ledger.reservations.items()):
            self.release(address, size)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
