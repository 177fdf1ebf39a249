"""AscendCL virtual memory through ctypes on libascendcl, for expert tensors on Ascend NPUs.

The calls are the ones vllm-ascend's camem allocator makes (aclrtReserveMemAddress, aclrtMallocPhysical,
aclrtMapMem, ...), with the same physical-memory properties: pinned ACL_HBM_MEM_HUGE memory on the
device, granularity from aclrtMemGetAllocationGranularity. The library is EXPERTWEAVE_LIBASCENDCL, else
"libascendcl.so" from the loader path (CANN's set_env.sh puts it there); under torch_npu that name
resolves to the copy torch_npu already loaded, so the calls run in the device context it set up.

Every type and constant below is copied from the torch-npu 2.10.0.post4 wheel's acl/acl_rt.h and
acl/error_codes/rt_error_codes.h; tests/ascend_shim/layout_check.c prints them from those headers and
tests/test_acl_backend.py compares them with these.

Errors: a non-zero aclError becomes one MemoryBackendError naming the call, the code as the header
names it and aclGetRecentErrMsg()'s text. Misuse never reaches the runtime: the ledger every backend
keeps (ledger.py) refuses unaligned sizes and addresses, mapping over a mapping or outside a
reservation, mapping a handle twice, unmapping a hole, releasing a range that is still mapped and
freeing a mapped handle, and, since AscendCL's release and unmap take no size, a size that differs
from the recorded one.

tensor() on an NPU: torch_npu._C._construct_storage_from_data_pointer(address, device, nbytes) builds
an NPU storage whose DataPtr has no deleter, so it never frees the range, and
torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata puts an ND-format NPU tensor on it. It is
the pair torch_npu itself uses to rebuild tensors over memory it does not own (torch_npu/npu/_graph_tree.py,
torchair's reconstruct_from_tensor_metadata). DLPack was the other candidate (torch_npu's
_npu_from_dlpack takes kDLExtDev tensors), but torch_npu's fromDLPack reads the producer's
DLManagedTensor again when the tensor dies, so a ctypes-built one would have to outlive every view.

view: how a mapped range becomes a tensor. None (production): an NPU tensor through torch_npu, so a
libascendcl without an importable torch_npu is refused at construction. The tests run this backend over
a stand-in libascendcl whose memory is host memory (tests/ascend_shim/acl_shim.c) and pass
memory.host_backend.host_bytes, which makes the device cpu.

Threads: AscendCL's calls act on the calling thread's context. The constructing thread and every thread the
loader starts bind the device first (bind_thread: aclrtSetDevice); the stand-in refuses memory calls from a
thread that did not, as the runtime does.

Not yet verified on Ascend hardware: tensor() through torch_npu, the device setup through
torch.npu.set_device and aclrtSetDevice on the loader's threads, synchronize() through torch_npu with its
task queue on, which error code the runtime returns for each misuse, and the text aclGetRecentErrMsg gives
for them.
"""

import ctypes
import math
import os
from typing import Callable

import torch

from ..errors import MemoryBackendError
from .ledger import MappingLedger

LIBRARY_ENV = "EXPERTWEAVE_LIBASCENDCL"

aclError = ctypes.c_int
aclrtDrvMemHandle = ctypes.c_void_p
aclrtMemGranularityOptions = ctypes.c_int

ACL_SUCCESS = 0
ACL_MEM_HANDLE_TYPE_NONE = 0
ACL_MEM_ALLOCATION_TYPE_PINNED = 0
ACL_HBM_MEM_HUGE = 4
ACL_MEM_LOCATION_TYPE_DEVICE = 1
ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0

# Codes the memory calls may return, named as the headers name them; any other code is shown as a number.
ACL_ERRORS = {
    "ACL_ERROR_INVALID_PARAM": 100000,
    "ACL_ERROR_UNINITIALIZE": 100001,
    "ACL_ERROR_BAD_ALLOC": 200000,
    "ACL_ERROR_API_NOT_SUPPORT": 200001,
    "ACL_ERROR_INVALID_DEVICE": 200002,
    "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED": 200003,
    "ACL_ERROR_INVALID_RESOURCE_HANDLE": 200005,
    "ACL_ERROR_FEATURE_UNSUPPORTED": 200006,
    "ACL_ERROR_RT_PARAM_INVALID": 107000,
    "ACL_ERROR_RT_INVALID_DEVICEID": 107001,
    "ACL_ERROR_RT_CONTEXT_NULL": 107002,
    "ACL_ERROR_RT_ADDR_UNALIGNED": 107008,
    "ACL_ERROR_RT_INVALID_HANDLE": 107017,
    "ACL_ERROR_RT_FEATURE_NOT_SUPPORT": 207000,
    "ACL_ERROR_RT_MEMORY_ALLOCATION": 207001,
    "ACL_ERROR_RT_MEMORY_FREE": 207002,
    "ACL_ERROR_RT_NO_DEVICE": 207004,
    "ACL_ERROR_RT_DEVICE_OOM": 207018,
    "ACL_ERROR_RT_INTERNAL_ERROR": 507000,
    "ACL_ERROR_RT_DRV_INTERNAL_ERROR": 507899,
}
_ERROR_NAMES = {code: name for name, code in ACL_ERRORS.items()}


class aclrtMemLocation(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint32), ("type", ctypes.c_int)]


class aclrtPhysicalMemProp(ctypes.Structure):
    _fields_ = [("handleType", ctypes.c_int), ("allocationType", ctypes.c_int), ("memAttr", ctypes.c_int),
                ("location", aclrtMemLocation), ("reserve", ctypes.c_uint64)]


_P = ctypes.POINTER
_SIGNATURES = {
    "aclrtMemGetAllocationGranularity": [_P(aclrtPhysicalMemProp), aclrtMemGranularityOptions, _P(ctypes.c_size_t)],
    "aclrtReserveMemAddress": [_P(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_uint64],
    "aclrtReleaseMemAddress": [ctypes.c_void_p],
    "aclrtMallocPhysical": [_P(aclrtDrvMemHandle), ctypes.c_size_t, _P(aclrtPhysicalMemProp), ctypes.c_uint64],
    "aclrtFreePhysical": [aclrtDrvMemHandle],
    "aclrtMapMem": [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, aclrtDrvMemHandle, ctypes.c_uint64],
    "aclrtUnmapMem": [ctypes.c_void_p],
    "aclrtSynchronizeDevice": [],
    "aclrtSetDevice": [ctypes.c_int32],
}


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _npu_device(device_id: int, library: str) -> torch.device:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError as e:
        raise MemoryBackendError(f"{library} is a real AscendCL but torch_npu is not importable "
                                 f"({_one_line(str(e))}), and only torch_npu can view NPU memory") from None
    device = torch.device("npu", device_id)
    # AscendCL memory calls act on the calling thread's current device.
    torch.npu.set_device(device)
    return device


def _npu_bytes(address: int, nbytes: int, device: torch.device) -> torch.Tensor:
    import torch_npu

    storage = torch_npu._C._construct_storage_from_data_pointer(address, device, nbytes)
    metadata = {"nbytes": nbytes, "data_ptr": address, "size": (nbytes,), "stride": (1,),
                "dtype": torch.uint8, "device": device, "storage_offset": 0}
    return torch_npu._C._construct_NPU_Tensor_From_Storage_And_Metadata(metadata, storage)


class AclBackend:
    def __init__(self, device_id: int = 0, library: str | None = None,
                 view: Callable[[int, int], torch.Tensor] | None = None):
        self.library = library or os.environ.get(LIBRARY_ENV) or "libascendcl.so"
        try:
            lib = ctypes.CDLL(self.library)
        except OSError as e:
            raise MemoryBackendError(f"cannot load AscendCL from {self.library} ({_one_line(str(e))}); "
                                     f"source CANN's set_env.sh or set {LIBRARY_ENV}") from None
        self._calls = {}
        for name, argtypes in _SIGNATURES.items():
            function = getattr(lib, name, None)
            if function is None:
                raise MemoryBackendError(f"{self.library} does not export {name}, an AscendCL virtual-memory call")
            function.argtypes, function.restype = argtypes, aclError
            self._calls[name] = function
        self._recent_error = getattr(lib, "aclGetRecentErrMsg", None)
        if self._recent_error is not None:
            self._recent_error.argtypes, self._recent_error.restype = [], ctypes.c_char_p
        self.device_id = device_id
        self.bind_thread()

        if view is None:
            self.device = _npu_device(device_id, self.library)
            self.view = lambda address, nbytes: _npu_bytes(address, nbytes, self.device)
            self._synchronize = lambda: torch.npu.synchronize(self.device)
        else:
            self.device, self.view = torch.device("cpu"), view
            self._synchronize = lambda: self.call("aclrtSynchronizeDevice")
        self._prop = aclrtPhysicalMemProp(
            handleType=ACL_MEM_HANDLE_TYPE_NONE, allocationType=ACL_MEM_ALLOCATION_TYPE_PINNED,
            memAttr=ACL_HBM_MEM_HUGE, location=aclrtMemLocation(device_id, ACL_MEM_LOCATION_TYPE_DEVICE))
        granularity = ctypes.c_size_t()
        self.call("aclrtMemGetAllocationGranularity", ctypes.byref(self._prop), ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM,
                  ctypes.byref(granularity))
        self.granularity = granularity.value
        self.ledger = MappingLedger(self.granularity)

    def call(self, name: str, *args) -> None:
        """One AscendCL call by name; any aclError becomes a MemoryBackendError."""
        error = self._calls[name](*args)
        if error == ACL_SUCCESS:
            return
        code = f"{_ERROR_NAMES[error]} ({error})" if error in _ERROR_NAMES else f"aclError {error}"
        recent = self._recent_error() if self._recent_error is not None else None
        detail = f": {_one_line(recent.decode(errors='replace'))}" if recent else ""
        raise MemoryBackendError(f"{name} failed with {code}{detail}")

    def bind_thread(self) -> None:
        """AscendCL's memory calls act on the calling thread's context: aclrtSetDevice gives the thread the
        device's default context (the one torch_npu's own set_device gives it; reference-counted, so a
        thread that has it already loses nothing). vllm-ascend's allocator ensures a context the same way
        before it maps (csrc/camem_allocator.cpp)."""
        self.call("aclrtSetDevice", self.device_id)

    def reserve(self, size: int) -> int:
        self.ledger.check_size("aclrtReserveMemAddress", size)
        address = ctypes.c_void_p()
        self.call("aclrtReserveMemAddress", ctypes.byref(address), size, 0, None, 0)
        self.ledger.reserved(address.value, size)
        return address.value

    def release(self, address: int, size: int) -> None:
        self.ledger.check_release("aclrtReleaseMemAddress", address, size)
        self.call("aclrtReleaseMemAddress", address)
        self.ledger.released(address)

    def create_physical(self, size: int) -> int:
        self.ledger.check_size("aclrtMallocPhysical", size)
        handle = aclrtDrvMemHandle()
        self.call("aclrtMallocPhysical", ctypes.byref(handle), size, ctypes.byref(self._prop), 0)
        self.ledger.created(handle.value, size)
        return handle.value

    def free_physical(self, handle: int) -> None:
        self.ledger.check_free("aclrtFreePhysical", handle)
        self.call("aclrtFreePhysical", handle)
        self.ledger.freed(handle)

    def map(self, address: int, size: int, handle: int) -> None:
        self.ledger.check_map("aclrtMapMem", address, size, handle)
        self.call("aclrtMapMem", address, size, 0, handle, 0)
        self.ledger.mapped(address, size, handle)

    def unmap(self, address: int, size: int) -> None:
        self.ledger.check_unmap("aclrtUnmapMem", address, size)
        self.call("aclrtUnmapMem", address)
        self.ledger.unmapped(address)

    def synchronize(self) -> None:
        """Waits for every stream of the device (vLLM's steps, ACL graph replays included). On an NPU through
        torch_npu: with TASK_QUEUE_ENABLE (vllm-ascend's default) its launches wait in a host-side queue
        first, which a bare aclrtSynchronizeDevice does not drain; torch.npu.synchronize drains it, then
        synchronizes the device. Over a stand-in (no torch_npu) the AscendCL call itself."""
        self._synchronize()

    def tensor(self, address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.view(address, dtype.itemsize * math.prod(shape)).view(dtype).view(shape)

    def close(self) -> None:
        """Unmaps, frees and releases whatever is still held; harmless twice."""
        for address, (size, _) in list(self.ledger.mappings.items()):
            self.unmap(address, size)
        for handle in list(self.ledger.handles):
            self.free_physical(handle)
        for address, size in list(self.ledger.reservations.items()):
            self.release(address, size)
