"""Physical memory handed out in whole granules, under a byte budget, counting the allocations made.

Warm granules (virtual_tensor.py) are allocated and mapped but hold no slot: they count as used, and
warm_budget_bytes bounds them (0, the default: every freed granule is unmapped at once, invariant I3).
"""

from typing import Any

from ..errors import CapacityError
from .backend import MemoryBackend


class PhysicalPool:
    def __init__(self, backend: MemoryBackend, budget_bytes: int | None = None, warm_budget_bytes: int = 0):
        self.backend = backend
        self.granularity = backend.granularity
        self.budget_bytes = budget_bytes
        self.warm_budget_bytes = warm_budget_bytes
        self.warm_bytes = 0
        self.used_bytes = 0
        self.allocations = 0  # physical allocations made (each is mapped once)

    @property
    def available_bytes(self) -> int | None:
        return None if self.budget_bytes is None else self.budget_bytes - self.used_bytes

    def check(self, nbytes: int, what: str) -> None:
        """Raises before anything changes when nbytes more would exceed the budget."""
        if self.budget_bytes is not None and self.used_bytes + nbytes > self.budget_bytes:
            raise CapacityError(f"{what} needs {nbytes / 2**20:.1f} MiB more physical memory, "
                                f"{self.available_bytes / 2**20:.1f} MiB of the "
                                f"{self.budget_bytes / 2**20:.1f} MiB budget is free")

    def keep_warm(self) -> bool:
        """Whether a granule whose last slot was freed may stay mapped; counts it if so."""
        if self.warm_bytes + self.granularity > self.warm_budget_bytes:
            return False
        self.warm_bytes += self.granularity
        return True

    def allocate(self, granules: int = 1) -> Any:
        """One physical allocation of this many granules."""
        nbytes = granules * self.granularity
        self.check(nbytes, "mapping granules")
        handle = self.backend.create_physical(nbytes)
        self.used_bytes += nbytes
        self.allocations += 1
        return handle

    def free(self, handle: Any, granules: int = 1) -> None:
        self.backend.free_physical(handle)
        self.used_bytes -= granules * self.granularity
