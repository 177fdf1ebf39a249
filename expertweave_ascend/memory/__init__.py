"""Virtual expert memory: reserved slot ranges, granule mapping, slot allocation, a budgeted pool."""

from .backend import MemoryBackend
from .expert_memory import ExpertMemory, WeightSpec
from .host_backend import DEFAULT_GRANULARITY, HostBackend
from .virtual_tensor import VirtualExpertTensor

__all__ = ["MemoryBackend", "ExpertMemory", "WeightSpec", "HostBackend", "DEFAULT_GRANULARITY",
           "VirtualExpertTensor"]
