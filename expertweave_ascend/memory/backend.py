"""The eight virtual-memory calls every device offers, as ExpertWeave uses them.

A backend reserves address ranges, creates physical chunks (one granule each here), maps and unmaps
them, waits for the device, and wraps a mapped range as a torch tensor. Host (mmap + memfd), CUDA (cuMem*) and AscendCL
(aclrtReserveMemAddress / aclrtMallocPhysical / aclrtMapMem) each implement it in one file.
"""

from typing import Any, Protocol

import torch


class MemoryBackend(Protocol):
    granularity: int  # bytes; every size and offset passed below is a multiple of it
    device: torch.device

    def reserve(self, size: int) -> int:
        """Reserves size bytes of address space, no physical memory; returns its address."""

    def release(self, address: int, size: int) -> None:
        """Gives back a reservation; nothing under it may still be mapped."""

    def create_physical(self, size: int) -> Any:
        """Allocates size bytes of physical memory; returns a handle."""

    def free_physical(self, handle: Any) -> None:
        """Frees physical memory; it must no longer be mapped."""

    def map(self, address: int, size: int, handle: Any) -> None:
        """Maps a physical handle at address (inside a reservation) for reading and writing."""

    def unmap(self, address: int, size: int) -> None:
        """Unmaps what map() put at address; the range stays reserved."""

    def bind_thread(self) -> None:
        """Makes the backend's device current on the calling thread, as the device's memory calls need: a
        thread started after the backend (the loader's) has none until it calls this."""

    def synchronize(self) -> None:
        """Returns once all device work queued so far has finished (before memory it may read is unmapped)."""

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A tensor viewing memory at address without owning it."""
