"""CudaBackend: over a stand-in libcuda built here from the real cuda.h, and on a GPU when there is one.

tests/cuda_stand_in/libcuda_stand_in.c is compiled with gcc against cuda.h of the CUDA release the pinned
cuda-bindings was generated from, so a function whose signature differs from the header's fails the build.
It is loaded under the driver's soname before cuda-bindings looks for a driver, so every call CudaBackend
makes goes through cuda-bindings' real wrappers into it. The whole memory suite runs on it, and again on a
real GPU (where the stand-in tests skip, since the process already has the real driver).
"""

import ctypes
import ctypes.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import memory_suite
import pinned
from expertweave_ascend.errors import MemoryBackendError
from expertweave_ascend.memory.cuda_backend import CudaBackend
from expertweave_ascend.memory.host_backend import host_bytes

SOURCE = Path(__file__).resolve().parent / "cuda_stand_in" / "libcuda_stand_in.c"
G = 2 << 20  # the stand-in's granularity
REAL_DRIVER = ctypes.util.find_library("cuda") is not None
GPU = torch.cuda.is_available()


def compile_stand_in(source: Path, output: Path) -> subprocess.CompletedProcess:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the stand-in libcuda from tests/cuda_stand_in; install gcc")
    # The stand-ins share tests/stand_in_host_vm.h.
    command = [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(pinned.cuda_include_dir()),
               "-I", str(SOURCE.parents[1]), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", str(source),
               "-o", str(output)]
    # LC_ALL=C keeps gcc's messages in plain ASCII quotes, so tests can match them.
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory) -> Path:
    if REAL_DRIVER:
        pytest.skip("a real CUDA driver is installed: the GPU tests run CudaBackend on it instead")
    library = tmp_path_factory.mktemp("cuda_stand_in") / "libcuda.so.1"
    result = compile_stand_in(SOURCE, library)
    if result.returncode:
        pytest.fail(f"gcc could not build {SOURCE.name}:\n{result.stderr}")
    # cuda-bindings takes a driver already loaded under libcuda.so.1 before searching the system.
    ctypes.CDLL(str(library), mode=os.RTLD_GLOBAL)
    return library


@pytest.fixture
def make_backend(stand_in):
    with memory_suite.closing_factory(lambda: CudaBackend(view=host_bytes)) as make:
        yield make


@pytest.fixture
def backend(make_backend):
    return make_backend()


@pytest.mark.parametrize("check", memory_suite.CHECKS, ids=lambda check: check.__name__)
def test_memory_suite_over_the_stand_in(check, make_backend):
    check(make_backend)


def test_unload_waits_for_the_device_before_unmapping(backend, stand_in, tiny, geometry):
    memory_suite.check_unload_synchronizes_before_releasing(backend, stand_in, tiny, geometry, "cuCtxSynchronize",
                                                            ("cuMemUnmap", "cuMemRelease"))


def test_the_stand_in_says_its_memory_is_host_memory(backend):
    memory_suite.check_stand_in_views_host_memory(backend, G)


def test_mapped_memory_is_readable_and_writable_only_after_set_access(backend):
    """cuMemMap alone leaves the range inaccessible, as on a GPU; the backend grants access itself."""
    address = backend.reserve(2 * G)
    handle = backend.create_physical(G)
    backend.map(address, G, handle)
    maps = Path("/proc/self/maps").read_text()
    assert re.search(rf"^{address:x}-{address + G:x} rw-s ", maps, re.MULTILINE), "mapped range is not rw"
    assert re.search(rf"^{address + G:x}-{address + 2 * G:x} ---p ", maps, re.MULTILINE), "the hole is accessible"
    backend.unmap(address, G)
    backend.free_physical(handle)
    backend.release(address, 2 * G)


def test_the_header_is_the_one_cuda_bindings_was_generated_from():
    from cuda import bindings

    header = (pinned.cuda_include_dir() / "cuda.h").read_text()
    version = int(re.search(r"^#define CUDA_VERSION (\d+)$", header, re.MULTILINE).group(1))
    major, minor = (int(part) for part in bindings.__version__.split(".")[:2])
    assert (version // 1000, version % 1000 // 10) == (major, minor)


def test_a_signature_that_differs_from_the_header_does_not_compile(tmp_path):
    source = SOURCE.read_text()
    original = "CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr, size_t size)"
    assert source.count(original) == 1
    altered = tmp_path / SOURCE.name
    altered.write_text(source.replace(original, "CUresult CUDAAPI cuMemUnmap(CUdeviceptr ptr)"))
    result = compile_stand_in(altered, tmp_path / "libcuda.so.1")
    assert result.returncode != 0
    assert "conflicting types for 'cuMemUnmap'" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------
# errors: one line naming the driver call and, for the driver's own refusals, its code and text

def assert_one_line(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message


def test_the_driver_refusing_a_device_names_the_call_and_its_code(stand_in):
    with pytest.raises(MemoryBackendError) as excinfo:
        CudaBackend(device_index=3)
    assert_one_line(excinfo, "cuDeviceGet failed with CUDA_ERROR_INVALID_DEVICE (101): invalid device ordinal")


def test_freeing_a_mapped_handle_is_refused_before_the_driver_would_defer_it(backend):
    """cuMemRelease of a mapped handle succeeds in CUDA (the memory lives until unmapped); the backend's
    accounting needs the free to be real, so it refuses first and the handle stays usable."""
    address = backend.reserve(G)
    handle = backend.create_physical(G)
    backend.map(address, G, handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.free_physical(handle)
    assert_one_line(excinfo, "cuMemRelease", "is still mapped")
    backend.unmap(address, G)
    backend.free_physical(handle)
    backend.release(address, G)


def test_the_stand_in_defers_a_release_of_mapped_memory_as_cuda_does(backend):
    """Straight to the driver: the release succeeds, the data stays readable until the unmap."""
    driver = backend.driver
    address = backend.reserve(G)
    handle = backend.call("cuMemCreate", G, backend._prop, 0)
    backend.call("cuMemMap", address, G, 0, handle, 0)
    backend.call("cuMemSetAccess", address, G, [backend._access], 1)
    view = backend.tensor(address, (G,), torch.uint8)
    view.fill_(9)
    backend.call("cuMemRelease", handle)
    assert bool((view == 9).all())
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.call("cuMemRelease", handle)  # released once already
    assert_one_line(excinfo, "CUDA_ERROR_INVALID_VALUE")
    (error,) = driver.cuMemUnmap(address, G)
    assert error == driver.CUresult.CUDA_SUCCESS
    backend.release(address, G)


@pytest.mark.parametrize("misuse, call, problem", [
    ("map_outside", "cuMemMap", "is not inside one reservation"),
    ("map_twice", "cuMemMap", "is already mapped elsewhere"),
    ("unmap_inside", "cuMemUnmap", "nothing is mapped at"),
    ("release_inside", "cuMemAddressFree", "is not a reservation"),
    ("free_unknown", "cuMemRelease", "is not a live physical handle"),
])
def test_refusals_name_the_call(backend, misuse, call, problem):
    address = backend.reserve(2 * G)
    handle = backend.create_physical(2 * G)
    small = backend.create_physical(G)
    with pytest.raises(MemoryBackendError) as excinfo:
        if misuse == "map_outside":
            backend.map(address + G, 2 * G, handle)
        elif misuse == "map_twice":
            backend.map(address, G, small)
            backend.map(address + G, G, small)
        elif misuse == "unmap_inside":
            backend.map(address, 2 * G, handle)
            backend.unmap(address + G, G)
        elif misuse == "release_inside":
            backend.release(address + G, G)
        else:
            backend.free_physical(handle + 1)
    assert_one_line(excinfo, call, problem)


def test_without_cuda_bindings_the_error_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_cuda(name, *args, **kwargs):
        if name.startswith("cuda"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cuda)
    with pytest.raises(MemoryBackendError) as excinfo:
        CudaBackend()
    assert_one_line(excinfo, "cuda-bindings", "pip install 'expertweave-ascend[cuda]'")


# ----------------------------------------------------------------------------------------------
# on a GPU: the real driver, device memory, torch CUDA tensors

gpu = pytest.mark.skipif(not GPU, reason="needs an NVIDIA GPU and a CUDA build of torch")


@pytest.fixture
def make_gpu_backend():
    torch.cuda.init()
    with memory_suite.closing_factory(lambda: CudaBackend(torch.cuda.current_device())) as make:
        yield make
        torch.cuda.synchronize()


@gpu
@pytest.mark.parametrize("check", memory_suite.CHECKS, ids=lambda check: check.__name__)
def test_memory_suite_on_the_gpu(check, make_gpu_backend):
    check(make_gpu_backend)


@gpu
def test_gpu_views_are_cuda_tensors_over_the_mapped_range(make_gpu_backend):
    backend = make_gpu_backend()
    assert backend.device.type == "cuda"
    g = backend.granularity
    address = backend.reserve(2 * g)
    handles = [backend.create_physical(g) for _ in range(2)]
    for i, handle in enumerate(handles):
        backend.map(address + i * g, g, handle)
    view = backend.tensor(address, (2 * g // 2,), torch.bfloat16)
    assert view.is_cuda and view.data_ptr() == address
    view.copy_(torch.arange(view.numel(), device=view.device).to(torch.bfloat16))
    matrix = view[: 256 * 256].view(256, 256)
    assert torch.equal(matrix @ torch.eye(256, device=view.device, dtype=torch.bfloat16), matrix)
    torch.cuda.synchronize()
    for i in range(2):
        backend.unmap(address + i * g, g)
    for handle in handles:
        backend.free_physical(handle)
    backend.release(address, 2 * g)
