"""An adapter read from disk, checked, and packed on the host in the engine's storage layout.

It is what the host tier keeps and what a device load copies from: per layer and weight one host tensor
[experts, *slot_shape], so a run of consecutive slots is filled by one copy. Every tensor in it is memory
of its own, copied out of the files, never a view of them. It remembers the identity of the files it was
read from, taken before they were read, so a copy whose files changed on disk since is not served again.
"""

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import FileIdentity, file_identity


@dataclass
class PackedAdapter:
    path: Path
    experts: dict[int, tuple[int, ...]]  # MoE layer -> tuned expert ids (layers that tune some only)
    weights: dict[int, dict[str, torch.Tensor]]  # layer -> weight name -> [len(experts[layer]), *slot_shape]
    expert_sha256: dict[int, tuple[str, ...]]  # layer -> content identity of each of experts[layer]
    sha256: str
    files: tuple[FileIdentity, ...]
    shared: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # layer -> tuned shared experts
    non_expert: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint name -> tuned tensor, as read

    @property
    def nbytes(self) -> int:
        return self.expert_nbytes + self.shared_nbytes + self.non_expert_nbytes

    @property
    def non_expert_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.non_expert.values())

    @property
    def expert_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.weights.values() for t in layer.values())

    @property
    def shared_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.shared.values() for t in layer.values())

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    def unchanged(self) -> bool:
        """Whether the files it was read from are still the same files, unmodified."""
        try:
            return tuple(file_identity(Path(f[0]), os.stat(f[0])) for f in self.files) == self.files
        except OSError:
            return False


class CheckedReads:
    """Each tensor's digest from the last read of an adapter's files that passed every check, keyed by the
    files' identities (FileIdentity: path, device, inode, size, mtime and ctime): a later read of the same
    versions of the files reuses them instead of hashing and checking every byte again. The reader confirms
    the files kept those identities through its read (PackedAdapter.unchanged). Thread-safe (loads and
    prefetches read on threads of their own); the least recently used of `capacity` adapters are dropped."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._digests: OrderedDict[tuple[FileIdentity, ...], dict[str, bytes]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, files: tuple[FileIdentity, ...]) -> dict[str, bytes] | None:
        with self._lock:
            digests = self._digests.get(files)
            if digests is not None:
                self._digests.move_to_end(files)
            return digests

    def put(self, files: tuple[FileIdentity, ...], digests: dict[str, bytes]) -> None:
        with self._lock:
            self._digests[files] = digests
            self._digests.move_to_end(files)
            while len(self._digests) > self.capacity:
                self._digests.popitem(last=False)

    def drop(self, files: tuple[FileIdentity, ...]) -> None:
        with self._lock:
            self._digests.pop(files, None)
