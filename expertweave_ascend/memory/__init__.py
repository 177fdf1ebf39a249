"""Virtual expert memory: reserved slot ranges, granule mapping, slot allocation, a budgeted pool."""

from .backend import MemoryBackend
from .expert_memory import ExpertMemory, WeightSpec
from .host_backend import DEFAULT_GRANULARITY, HostBackend
from .virtual_tensor import VirtualExpertTensor

__all__ = ["MemoryBackend", "ExpertMemory", "WeightSpec", "HostBackend", "DEFAULT_GRANULARITY",
           "VirtualExpertTensor", "backend_for"]


def backend_for(device, granularity: int | None = None) -> MemoryBackend:
    """The virtual-memory backend of a torch device: host memory on the CPU (granules of granularity,
    default 2 MiB), the CUDA driver's on a GPU (whose granularity the driver fixes)."""
    import torch

    from ..errors import MemoryBackendError

    device = torch.device(device)
    if device.type == "cpu":
        return HostBackend(granularity or DEFAULT_GRANULARITY)
    if device.type != "cuda":
        raise MemoryBackendError(f"no virtual-memory backend for device {device} here (cpu or cuda; NPU engines "
                                 "use memory.acl_backend)")
    from .cuda_backend import CudaBackend

    backend = CudaBackend(device.index if device.index is not None else torch.cuda.current_device())
    if granularity not in (None, backend.granularity):
        backend.close()
        raise MemoryBackendError(f"granularity {granularity}: CUDA maps in the driver's granules of "
                                 f"{backend.granularity} bytes")
    return backend
