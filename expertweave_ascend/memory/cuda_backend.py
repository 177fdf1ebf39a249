"""CUDA virtual memory through the driver API (cuda-bindings), for expert tensors on NVIDIA GPUs.

The calls are cuMemGetAllocationGranularity, cuMemAddressReserve / cuMemAddressFree, cuMemCreate /
cuMemRelease, cuMemMap / cuMemUnmap and cuMemSetAccess, on pinned device memory of one GPU, in that GPU's
primary context (the one torch's runtime uses, so both see the same addresses). A mapped range becomes a
torch tensor through an object exposing __cuda_array_interface__: torch.as_tensor keeps that object alive
and never frees the range.

What is mapped where is checked here before the driver is called, with the same refusals as HostBackend:
the driver accepts some of them with other meanings (cuMemRelease of a mapped handle succeeds and frees
the memory at its last unmap; one handle may be mapped at several addresses), which would silently break
the byte accounting ExpertMemory keeps. A CUresult other than CUDA_SUCCESS becomes one MemoryBackendError
naming the call, the code's name and the driver's text for it.

Stand-in: tests/cuda_stand_in/libcuda_stand_in.c implements these calls over host memory and exports
expertweave_cuda_stand_in. With it the memory is host memory, so the device is cpu and tensor() returns a
CPU view, as HostBackend's does.
"""

import ctypes
import math
import os

import torch

from ..errors import MemoryBackendError

STAND_IN_SYMBOL = "expertweave_cuda_stand_in"
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
    def __init__(self, device_index: int = 0):
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
        # The driver's memory calls act on the calling thread's context: make the primary one current,
        # as torch does on its first CUDA call.
        self._context = self.call("cuDevicePrimaryCtxRetain", self._device)
        if not int(self.call("cuCtxGetCurrent")):
            self.call("cuCtxSetCurrent", self._context)

        self.stand_in = hasattr(ctypes.CDLL(DRIVER_SONAME, mode=os.RTLD_NOLOAD), STAND_IN_SYMBOL)
        self.device = torch.device("cpu") if self.stand_in else torch.device("cuda", device_index)
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
        self._reservations: dict[int, int] = {}  # address -> size
        self._mappings: dict[int, tuple[int, int]] = {}  # address -> (size, handle)
        self._mapped_granules: set[int] = set()  # address of every mapped granule, for O(1) overlap checks
        self._handles: dict[int, object] = {}  # handle as int -> the driver's handle object
        self._mapped_handles: set[int] = set()

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

    def _check_size(self, call: str, size: int) -> None:
        if size <= 0 or size % self.granularity:
            raise MemoryBackendError(f"{call}: size {size} is not a positive multiple of the "
                                     f"granularity {self.granularity}")

    def reserve(self, size: int) -> int:
        self._check_size("cuMemAddressReserve", size)
        address = int(self.call("cuMemAddressReserve", size, self.granularity, 0, 0))
        self._reservations[address] = size
        return address

    def release(self, address: int, size: int) -> None:
        if self._reservations.get(address) != size:
            raise MemoryBackendError(f"cuMemAddressFree: 0x{address:x}+{size} is not a reservation")
        if any(address <= a < address + size for a in self._mappings):
            raise MemoryBackendError(f"cuMemAddressFree: 0x{address:x} still has memory mapped in it")
        self.call("cuMemAddressFree", address, size)
        del self._reservations[address]

    def create_physical(self, size: int) -> int:
        self._check_size("cuMemCreate", size)
        handle = self.call("cuMemCreate", size, self._prop, 0)
        self._handles[int(handle)] = handle
        return int(handle)

    def free_physical(self, handle: int) -> None:
        if handle not in self._handles:
            raise MemoryBackendError(f"cuMemRelease: {handle:#x} is not a live physical handle")
        if handle in self._mapped_handles:
            raise MemoryBackendError(f"cuMemRelease: handle {handle:#x} is still mapped; unmap it first")
        self.call("cuMemRelease", self._handles[handle])
        del self._handles[handle]

    def map(self, address: int, size: int, handle: int) -> None:
        self._check_size("cuMemMap", size)
        if address % self.granularity:
            raise MemoryBackendError(f"cuMemMap: address 0x{address:x} is not a multiple of the "
                                     f"granularity {self.granularity}")
        if not any(a <= address and address + size <= a + n for a, n in self._reservations.items()):
            raise MemoryBackendError(f"cuMemMap: 0x{address:x}+{size} is not inside one reservation")
        if handle not in self._handles:
            raise MemoryBackendError(f"cuMemMap: {handle:#x} is not a live physical handle")
        granules = range(address, address + size, self.granularity)
        if any(a in self._mapped_granules for a in granules):
            raise MemoryBackendError(f"cuMemMap: 0x{address:x}+{size} overlaps memory that is already mapped")
        if handle in self._mapped_handles:
            raise MemoryBackendError(f"cuMemMap: handle {handle:#x} is already mapped elsewhere")
        self.call("cuMemMap", address, size, 0, self._handles[handle], 0)
        try:
            self.call("cuMemSetAccess", address, size, [self._access], 1)
        except MemoryBackendError:
            self.call("cuMemUnmap", address, size)
            raise
        self._mappings[address] = (size, handle)
        self._mapped_granules.update(granules)
        self._mapped_handles.add(handle)

    def unmap(self, address: int, size: int) -> None:
        if self._mappings.get(address, (None,))[0] != size:
            raise MemoryBackendError(f"cuMemUnmap: nothing is mapped at 0x{address:x}+{size}")
        self.call("cuMemUnmap", address, size)
        _, handle = self._mappings.pop(address)
        self._mapped_granules.difference_update(range(address, address + size, self.granularity))
        self._mapped_handles.discard(handle)

    def synchronize(self) -> None:
        """Waits for every stream of the primary context (vLLM's steps, CUDA graph replays included)."""
        self.call("cuCtxSynchronize")

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize * math.prod(shape)
        if self.stand_in:
            raw = torch.frombuffer((ctypes.c_ubyte * nbytes).from_address(address), dtype=torch.uint8)
        else:
            raw = torch.as_tensor(_DeviceArray(address, nbytes), device=self.device)
        return raw.view(dtype).view(shape)

    def close(self) -> None:
        """Unmaps, frees and releases whatever is still held, then lets go of the primary context."""
        for address, (size, _) in list(self._mappings.items()):
            self.unmap(address, size)
        for handle in list(self._handles):
            self.free_physical(handle)
        for address, size in list(self._reservations.items()):
            self.release(address, size)
        if self._context is not None:
            self.call("cuDevicePrimaryCtxRelease", self._device)
            self._context = None
