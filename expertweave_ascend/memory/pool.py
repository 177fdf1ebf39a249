"""Physical memory handed out one granule at a time, under a byte budget."""

from typing import Any

from ..errors import CapacityError
from .backend import MemoryBackend


class PhysicalPool:
    def __init__(self, backend: MemoryBackend, budget_bytes: int | None = None):
        self.backend = backend
        self.granularity = backend.granularity
        self.budget_bytes = budget_bytes
        self.used_bytes = 0

    @property
    def available_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.used_bytes

    def check(self, nbytes: int, what: str) -> None:
        """Raises before anything changes when nbytes more would exceed the budget."""
        if self.budget_bytes is not None and self.used_bytes + nbytes > self.budget_bytes:
            raise CapacityError(f"{what} needs {nbytes / 2**20:.1f} MiB more physical memory, "
                                f"{self.available_bytes / 2**20:.1f} MiB of the "
                                f"{self.budget_bytes / 2**20:.1f} MiB budget is free")

    def allocate(self) -> Any:
        self.check(self.granularity, "mapping a granule")
        handle = self.backend.create_physical(self.granularity)
        self.used_bytes += self.granularity
        return handle

    def free(self, handle: Any) -> None:
        self.backend.free_physical(handle)
        self.used_bytes -= self.granularity
