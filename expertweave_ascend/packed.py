"""An adapter read from disk, checked, and packed on the host in the engine's storage layout.

It is what the host tier keeps and what a device load copies from: per layer and weight one host tensor
[experts, *slot_shape], so a run of consecutive slots is filled by one copy. It remembers the identity of
the files it was read from, so a copy whose files changed on disk is not served.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import EsftAdapter
from .adapters.esft import CFG_NAME

FileIdentity = tuple[str, int, int, int, int, int]  # path, device, inode, size, mtime_ns, ctime_ns


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
            return tuple(_identity(Path(f[0])) for f in self.files) == self.files
        except OSError:
            return False


def file_identities(adapter: EsftAdapter) -> tuple[FileIdentity, ...]:
    files = {adapter.path / CFG_NAME, *(adapter.file_of(key) for key in adapter.keys.values())}
    return tuple(_identity(f) for f in sorted(files))


def _identity(path: Path) -> FileIdentity:
    st = os.stat(path)
    return str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns
