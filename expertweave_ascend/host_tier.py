"""The host tier: packed adapters kept in host memory (pinned on GPU/NPU) under a byte budget, least
recently used dropped first, so loading one of them onto the device is a copy per run of slots instead
of a read of its files. Entries are looked up by adapter name and path, and only while their files are
unchanged. Thread-safe: the worker's loader thread fills it while the engine's thread reads it.
"""

import threading
from collections import OrderedDict
from pathlib import Path

from .packed import PackedAdapter


class HostTier:
    def __init__(self, budget_bytes: int = 0):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, PackedAdapter] = OrderedDict()
        self._bytes = 0  # of the entries
        self._lock = threading.Lock()

    def get(self, name: str, path: str | Path) -> PackedAdapter | None:
        with self._lock:
            packed = self._entries.get(name)
            if packed is None:
                return None
            if packed.path != Path(path).resolve() or not packed.unchanged():
                self._remove(name)
                return None
            self._entries.move_to_end(name)
            return packed

    def put(self, name: str, packed: PackedAdapter, make_room: bool = True) -> bool:
        """Keeps the packed adapter, dropping the least recently used ones for room (with make_room, else
        only into free room); False if it cannot fit."""
        nbytes = packed.nbytes
        with self._lock:
            self._remove(name)
            if nbytes > self.budget_bytes or (not make_room and self._bytes + nbytes > self.budget_bytes):
                return False
            while self._bytes + nbytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))
            self._entries[name] = packed
            self._bytes += nbytes
            return True

    def drop(self, name: str) -> None:
        with self._lock:
            self._remove(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def resident_bytes(self) -> int:
        return self._bytes

    def _remove(self, name: str) -> None:
        packed = self._entries.pop(name, None)
        if packed is not None:
            self._bytes -= packed.nbytes
