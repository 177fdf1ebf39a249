"""CUDA virtual memory through the driver API (cuda-bindings), for expert tensors on NVIDIA GPUs.

The calls are cuMemGetAllocationGranularity, cuMemAddressReserve / cuMemAddressFree, cuMemCreate /
cuMemRelease, cuMemMap / cuMemUnmap and cuMemSetAccess, on pinned device memory of one GPU, in that GPU's
primary context (the one torch's runtime uses, so both see the same addresses). A mapped range becomes a
torch tensor through an object exposing __cuda_array_interface__: torch.as_tensor keeps that object alive
and never frees the range.

What is mapped where is checked before the driver is called, by the ledger every backend keeps
(ledger.py): the driver accepts some misuse with other meanings (cuMemRelease of a mapped handle succeeds
and frees the memory at its last unmap; one handle may be mapped at several addresses), which would
silently break the byte accounting ExpertMemory keeps. A CUresult other than CUDA_SUCCESS becomes one
MemoryBackendError naming the call, the code's name and the driver's text for it.

view: how a mapped range becomes a tensor. None (production): a CUDA tensor through
__cuda_array_interface__. The tests run this backend over a stand-in libcuda whose memory is host memory
(tests/cuda_stand_in) and pass memory.host_backend.host_bytes, which makes the device cpu.
"""

import math
from typing import Callable

import torch

from ..errors import MemoryBackendError
from .ledger import MappingLedger

DRIVER_SONAME = "libcuda.so.1"


def _driver():
    try:
        from cuda.bindings import driver
    except ImportError as e:
        raise MemoryBackendError(f"the CUDA backend needs cuda-bindings ({e}); "
                                 "install it with pip install 'expertweave-ascend[cuda]'") from None
    return driver


class _DeviceArray:
    """The least torch.as_tensor needs to view device memory it does not own: CUDA Array Interface v3."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "strides": None, "version": 3}


class CudaBackend:
    def __init__(self, device_index: int = 0, view: Callable[[int, int], torch.Tensor] | None = None):
        self.driver = driver = _driver()
        try:
            (error,) = driver.cuInit(0)
        except Exception as e:  # cuda-bindings' loader raises its own error types when no driver loads
            raise MemoryBackendError(f"cannot load the CUDA driver {DRIVER_SONAME} "
                                     f"({' '.join(str(e).split())})") from None
        self._check("cuInit", error)
        self._device = self.call("cuDeviceGet", device_index)
        supported = self.call("cuDeviceGetAttribute",
                              driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                              self._device)
        if not supported:
            raise MemoryBackendError(f"CUDA device {device_index} does not support virtual memory management "
                                     "(cuMemCreate / cuMemMap)")
        self._context = self.call("cuDevicePrimaryCtxRetain", self._device)
        self.bind_thread()

        self.view = view or (lambda address, nbytes: torch.as_tensor(_DeviceArray(address, nbytes), device=self.device))
        self.device = torch.device("cpu") if view is not None else torch.device("cuda", device_index)
        location = driver.CUmemLocation()
        location.type = driver.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        location.id = device_index
        self._prop = driver.CUmemAllocationProp()
        self._prop.type = driver.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        self._prop.location = location
        self._access = driver.CUmemAccessDesc()
        self._access.location = location
        self._access.flags = driver.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self.granularity = self.call("cuMemGetAllocationGranularity", self._prop,
                                     driver.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM)
        self.ledger = MappingLedger(self.granularity)
        self._handles: dict[int, object] = {}  # handle as int -> the driver's handle object

    def bind_thread(self) -> None:
        """The driver's memory calls act on the calling thread's context: makes the primary one current where
        the thread has none, as torch does on its first CUDA call."""
        if not int(self.call("cuCtxGetCurrent")):
            self.call("cuCtxSetCurrent", self._context)

    def call(self, name: str, *args):
        """One driver call by name; returns what it gives back besides its CUresult (one value or None)."""
        error, *results = getattr(self.driver, name)(*args)
        self._check(name, error)
        return results[0] if results else None

    def _check(self, name: str, error) -> None:
        if error == self.driver.CUresult.CUDA_SUCCESS:
            return
        _, code = self.driver.cuGetErrorName(error)
        _, text = self.driver.cuGetErrorString(error)
        code = code.decode() if code else f"CUresult {int(error)}"
        text = f": {text.decode()}" if text else ""
        raise MemoryBackendError(f"{name} failed with {code} ({int(error)}){text}")

    def reserve(self, size: int) -> int:
        self.ledger.check_size("cuMemAddressReserve", size)
        address = int(self.call("cuMemAddressReserve", size, self.granularity, 0, 0))
        self.ledger.reserved(address, size)
        return address

    def release(self, address: int, size: int) -> None:
        self.ledger.check_release("cuMemAddressFree", address, size)
        self.call("cuMemAddressFree", address, size)
        self.ledger.released(address)

    def create_physical(self, size: int) -> int:
        self.ledger.check_size("cuMemCreate", size)
        handle = self.call("cuMemCreate", size, self._prop, 0)
        self._handles[int(handle)] = handle
        self.ledger.created(int(handle), size)
        return int(handle)

    def free_physical(self, handle: int) -> None:
        self.ledger.check_free("cuMemRelease", handle)
        self.call("cuMemRelease", self._handles[handle])
        del self._handles[handle]
        self.ledger.freed(handle)

    def map(self, address: int, size: int, handle: int) -> None:
        self.ledger.check_map("cuMemMap", address, size, handle)
        self.call("cuMemMap", address, size, 0, self._handles[handle], 0)
        try:
            self.call("cuMemSetAccess", address, size, [self._access], 1)
        except MemoryBackendError:
            self.call("cuMemUnmap", address, size)
            raise
        self.ledger.mapped(address, size, handle)

    def unmap(self, address: int, size: int) -> None:
        self.ledger.check_unmap("cuMemUnmap", address, size)
        self.call("cuMemUnmap", address, size)
        self.ledger.unmapped(address)

    def synchronize(self) -> None:
        """Waits for every stream of the primary context (vLLM's steps, CUDA graph replays included)."""
        self.call("cuCtxSynchronize")

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.view(address, dtype.itemsize * math.prod(shape)).view(dtype).view(shape)

    def close(self) -> None:
        """Unmaps, frees and releases whatever is still held, then lets go of the primary context."""
        for address, (size, _) in list(self.ledger.mappings.items()):
            self.unmap(address, size)
        for handle in list(self.ledger.handles):
            self.free_physical(handle)
        for address, size in list(self.ledger.reservations.items()):
            self.release(address, size)
        if self._context is not None:
            self.call("cuDevicePrimaryCtxRelease", self._device)
            self._context = None
