"""AclBackend over a stand-in libascendcl built here from the real AscendCL headers.

tests/ascend_shim/acl_shim.c is compiled with gcc against torch_npu's copy of acl/acl_rt.h, so a
function whose signature differs from the header's fails the build. The whole memory suite runs on
AclBackend over it, and every refusal must come back as one MemoryBackendError naming the AscendCL
call, the header's name for the code and the runtime's message. tests/ascend_shim/layout_check.c
prints every struct layout and constant the ctypes binding copies by hand, as the headers have them.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import memory_suite
from npu import on_npu
import pinned
from expertweave_ascend.errors import MemoryBackendError
from expertweave_ascend.memory import acl_backend
from expertweave_ascend.memory.acl_backend import ACL_ERRORS, AclBackend
from expertweave_ascend.memory.host_backend import host_bytes

SOURCES = Path(__file__).resolve().parent / "ascend_shim"
G = 2 << 20  # the stand-in's granularity


def compile_c(source: Path, output: Path, *flags: str) -> subprocess.CompletedProcess:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build the stand-in libascendcl from tests/ascend_shim; install gcc")
    # The stand-ins share tests/stand_in_host_vm.h.
    command = [gcc, "-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(pinned.acl_include_dir()),
               "-I", str(SOURCES.parent), *flags, str(source), "-o", str(output)]
    # LC_ALL=C keeps gcc's messages in plain ASCII quotes, so tests can match them.
    return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})


def build(source: Path, output: Path, *flags: str) -> Path:
    result = compile_c(source, output, *flags)
    if result.returncode:
        pytest.fail(f"gcc could not build {source.name}:\n{result.stderr}")
    return output


@pytest.fixture(scope="session")
def shim(tmp_path_factory) -> Path:
    return build(SOURCES / "acl_shim.c", tmp_path_factory.mktemp("acl_shim") / "libascendcl.so", "-shared", "-fPIC")


@pytest.fixture
def make_backend(shim):
    """A factory of fresh backends over the stand-in, all closed after the test."""
    with memory_suite.closing_factory(lambda: AclBackend(library=str(shim), view=host_bytes)) as make:
        yield make


@pytest.fixture
def backend(make_backend):
    return make_backend()


@pytest.mark.parametrize("check", memory_suite.CHECKS, ids=lambda check: check.__name__)
def test_memory_suite(check, make_backend):
    check(make_backend)


def test_unload_waits_for_the_device_before_unmapping(backend, shim, tiny, geometry):
    memory_suite.check_unload_synchronizes_before_releasing(backend, shim, tiny, geometry, "aclrtSynchronizeDevice",
                                                            ("aclrtUnmapMem", "aclrtFreePhysical"))


def test_the_stand_in_says_its_memory_is_host_memory(backend):
    memory_suite.check_stand_in_views_host_memory(backend, G)


# ----------------------------------------------------------------------------------------------
# the binding against the headers

def test_layouts_and_constants_match_the_headers(tmp_path):
    program = build(SOURCES / "layout_check.c", tmp_path / "layout_check")
    lines = [line.split() for line in subprocess.run([str(program)], capture_output=True, text=True,
                                                     check=True).stdout.splitlines()]
    sizes = {name: int(size) for kind, name, size in (l for l in lines if l[0] == "sizeof")}
    fields = {(struct, member): (int(offset), int(size))
              for _, struct, member, offset, size in (l for l in lines if l[0] == "field")}
    constants = {name: int(value) for kind, name, value in (l for l in lines if l[0] == "const")}
    assert len(sizes) + len(fields) + len(constants) == len(lines), "layout_check printed an unknown line"

    declared = vars(acl_backend)
    structs = {n: t for n, t in declared.items() if isinstance(t, type) and issubclass(t, ctypes.Structure)}
    aliases = {n: t for n, t in declared.items()
               if n.startswith("acl") and isinstance(t, type) and issubclass(t, ctypes._SimpleCData)}
    python_constants = {n: v for n, v in declared.items() if n.startswith("ACL_") and isinstance(v, int)}

    # every hand-copied declaration is checked, and the checker checks nothing that is not declared
    assert set(sizes) == set(structs) | set(aliases)
    assert set(fields) == {(n, f[0]) for n, t in structs.items() for f in t._fields_}
    assert set(constants) == set(python_constants) | set(ACL_ERRORS)

    assert {n: ctypes.sizeof(t) for n, t in (structs | aliases).items()} == sizes
    assert {(n, m): (getattr(structs[n], m).offset, getattr(structs[n], m).size) for n, m in fields} == fields
    assert python_constants | ACL_ERRORS == constants


def test_a_signature_that_differs_from_the_header_does_not_compile(tmp_path):
    source = (SOURCES / "acl_shim.c").read_text()
    original = "aclError aclrtUnmapMem(void *virPtr)"
    assert source.count(original) == 1
    altered = tmp_path / "acl_shim.c"
    altered.write_text(source.replace(original, "aclError aclrtUnmapMem(void *virPtr, size_t size)"))
    result = compile_c(altered, tmp_path / "libascendcl.so", "-shared", "-fPIC")
    assert result.returncode != 0
    assert "conflicting types for 'aclrtUnmapMem'" in result.stderr, result.stderr


# ----------------------------------------------------------------------------------------------
# refusals: one line naming the call, the header's code and the runtime's message

def device_prop() -> ctypes.Structure:
    """The physical-memory properties AclBackend asks for, on device 0."""
    location = acl_backend.aclrtMemLocation(0, acl_backend.ACL_MEM_LOCATION_TYPE_DEVICE)
    return acl_backend.aclrtPhysicalMemProp(memAttr=acl_backend.ACL_HBM_MEM_HUGE, location=location)


def assert_refused(excinfo, call: str, error: str, detail: str) -> None:
    message = str(excinfo.value)
    assert message.startswith(f"{call} failed with {error} ({ACL_ERRORS[error]}): "), message
    assert detail in message, message
    assert "\n" not in message


def assert_refused_first(excinfo, call: str, detail: str) -> None:
    """Refused by the backend's ledger before the call: the call named, no runtime code."""
    message = str(excinfo.value)
    assert message.startswith(f"{call}: ") and detail in message and "\n" not in message, message


def test_mapping_over_a_mapping(backend):
    address = backend.reserve(2 * G)
    first, second, double = backend.create_physical(G), backend.create_physical(G), backend.create_physical(2 * G)
    backend.map(address + G, G, first)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.map(address + G, G, second)
    assert_refused_first(excinfo, "aclrtMapMem", "overlaps memory that is already mapped")
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.map(address, 2 * G, double)  # starts in the hole, ends on the mapping
    assert_refused_first(excinfo, "aclrtMapMem", "overlaps memory that is already mapped")
    backend.map(address, G, second)  # the refused calls left the hole free


def test_the_stand_in_refuses_a_map_over_a_mapping_itself(backend):
    """Straight to the library, past the ledger: the stand-in refuses as a device does."""
    address = backend.reserve(2 * G)
    first, second = backend.create_physical(G), backend.create_physical(G)
    backend.map(address, G, first)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.call("aclrtMapMem", address, G, 0, second, 0)
    assert_refused(excinfo, "aclrtMapMem", "ACL_ERROR_RT_PARAM_INVALID", "overlaps memory that is already mapped")


def test_mapping_outside_a_reservation_or_a_handle_twice(backend):
    address = backend.reserve(2 * G)
    handle = backend.create_physical(G)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.map(address + G, 2 * G, handle)
    assert_refused_first(excinfo, "aclrtMapMem", "is not inside one reservation")
    backend.map(address, G, handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.map(address + G, G, handle)
    assert_refused_first(excinfo, "aclrtMapMem", "is already mapped elsewhere")


def test_unmapping_what_is_not_mapped(backend):
    address = backend.reserve(3 * G)
    handle = backend.create_physical(2 * G)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.unmap(address, G)
    assert_refused_first(excinfo, "aclrtUnmapMem", f"nothing is mapped at 0x{address:x}")
    backend.map(address, 2 * G, handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.unmap(address + G, G)  # inside a mapping, not where it starts
    assert_refused_first(excinfo, "aclrtUnmapMem", "nothing is mapped at")
    backend.unmap(address, 2 * G)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.unmap(address, 2 * G)  # twice
    assert_refused_first(excinfo, "aclrtUnmapMem", "nothing is mapped at")


def test_releasing_a_reservation_that_still_has_mappings(backend):
    address = backend.reserve(2 * G)
    handle = backend.create_physical(G)
    backend.map(address + G, G, handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.release(address, 2 * G)
    assert_refused_first(excinfo, "aclrtReleaseMemAddress", "still has memory mapped in it")
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.release(address + G, G)  # not where a reservation starts
    assert_refused_first(excinfo, "aclrtReleaseMemAddress", "is not a reservation")
    backend.unmap(address + G, G)
    backend.release(address, 2 * G)


def test_freeing_a_handle_that_is_still_mapped_or_already_freed(backend):
    address = backend.reserve(G)
    handle = backend.create_physical(G)
    backend.map(address, G, handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.free_physical(handle)
    assert_refused_first(excinfo, "aclrtFreePhysical", f"is still mapped at 0x{address:x}")
    backend.unmap(address, G)
    backend.free_physical(handle)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.free_physical(handle)
    assert_refused_first(excinfo, "aclrtFreePhysical", "is not a live physical handle")
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.map(address, G, handle)
    assert_refused_first(excinfo, "aclrtMapMem", "is not a live physical handle")


def test_sizes_that_differ_from_the_recorded_ones_are_refused_before_the_call(backend):
    """AscendCL's release and unmap take no size; the backend checks the one it is given."""
    address = backend.reserve(2 * G)
    handle = backend.create_physical(G)
    backend.map(address, G, handle)
    with pytest.raises(MemoryBackendError, match=r"^aclrtUnmapMem: 0x[0-9a-f]+ was mapped with 2097152 bytes, "
                                                 r"not 4194304$"):
        backend.unmap(address, 2 * G)
    backend.unmap(address, G)
    with pytest.raises(MemoryBackendError, match=r"^aclrtReleaseMemAddress: 0x[0-9a-f]+ was reserved with "
                                                 r"4194304 bytes, not 2097152$"):
        backend.release(address, G)
    backend.free_physical(handle)
    backend.release(address, 2 * G)


def test_unaligned_sizes_are_refused_before_the_call_naming_it(backend):
    for call, refuse in [("aclrtReserveMemAddress", lambda: backend.reserve(G // 2)),
                         ("aclrtMallocPhysical", lambda: backend.create_physical(G + G // 2)),
                         ("aclrtMapMem", lambda: backend.map(backend.reserve(G), G // 2, 0))]:
        with pytest.raises(MemoryBackendError, match=f"^{call}: size .* is not a positive multiple of the "
                                                     f"granularity {G}$"):
            refuse()


def test_the_stand_in_refuses_unaligned_sizes_itself(backend):
    """What the backend refuses first, the stand-in refuses too, as the device does."""
    prop = ctypes.byref(device_prop())
    address = backend.reserve(2 * G)
    handle = backend.create_physical(G)
    out, out_handle = ctypes.c_void_p(), acl_backend.aclrtDrvMemHandle()
    refusals = [
        ("aclrtReserveMemAddress", (ctypes.byref(out), G // 2, 0, None, 0), "ACL_ERROR_RT_PARAM_INVALID"),
        ("aclrtReserveMemAddress", (ctypes.byref(out), 0, 0, None, 0), "ACL_ERROR_RT_PARAM_INVALID"),
        ("aclrtMallocPhysical", (ctypes.byref(out_handle), G // 2, prop, 0), "ACL_ERROR_RT_PARAM_INVALID"),
        ("aclrtMapMem", (address, G // 2, 0, handle, 0), "ACL_ERROR_RT_PARAM_INVALID"),
        ("aclrtMapMem", (address + G // 2, G, 0, handle, 0), "ACL_ERROR_RT_ADDR_UNALIGNED"),
        ("aclrtMapMem", (address, G, G // 2, handle, 0), "ACL_ERROR_RT_ADDR_UNALIGNED"),
    ]
    for call, args, error in refusals:
        with pytest.raises(MemoryBackendError) as excinfo:
            backend.call(call, *args)
        assert_refused(excinfo, call, error, f"{call}: ")
        assert "multiple of 2097152" in str(excinfo.value)
    assert out.value is None and out_handle.value is None, "a refused call wrote its result"
    backend.map(address, G, handle)  # nothing was mapped by the refused calls


def test_the_stand_in_refuses_null_pointers_and_reserved_arguments(backend):
    prop = ctypes.byref(device_prop())
    size = ctypes.c_size_t()
    out, out_handle = ctypes.c_void_p(), acl_backend.aclrtDrvMemHandle()
    address = backend.reserve(G)
    handle = backend.create_physical(G)
    refusals = [
        ("aclrtMemGetAllocationGranularity", (None, 0, ctypes.byref(size)), "is NULL"),
        ("aclrtMemGetAllocationGranularity", (prop, 0, None), "is NULL"),
        ("aclrtReserveMemAddress", (None, G, 0, None, 0), "virPtr is NULL"),
        ("aclrtReserveMemAddress", (ctypes.byref(out), G, 0, address, 0), "must be 0"),
        ("aclrtReserveMemAddress", (ctypes.byref(out), G, 0, None, 1), "must be 0"),
        ("aclrtMallocPhysical", (None, G, prop, 0), "is NULL"),
        ("aclrtMallocPhysical", (ctypes.byref(out_handle), G, None, 0), "is NULL"),
        ("aclrtMallocPhysical", (ctypes.byref(out_handle), G, prop, 1), "flags must be 0"),
        ("aclrtMapMem", (None, G, 0, handle, 0), "is NULL"),
        ("aclrtMapMem", (address, G, 0, None, 0), "is NULL"),
        ("aclrtMapMem", (address, G, 0, handle, 1), "flags must be 0"),
    ]
    for call, args, detail in refusals:
        with pytest.raises(MemoryBackendError) as excinfo:
            backend.call(call, *args)
        assert_refused(excinfo, call, "ACL_ERROR_RT_PARAM_INVALID", detail)
    assert out.value is None and out_handle.value is None and size.value == 0


def test_a_device_that_does_not_exist(shim):
    with pytest.raises(MemoryBackendError) as excinfo:
        AclBackend(device_id=1, library=str(shim), view=host_bytes)
    assert_refused(excinfo, "aclrtSetDevice", "ACL_ERROR_RT_INVALID_DEVICEID", "device 1 does not exist")


def in_a_new_thread(work):
    """work() on a thread of its own (no device bound, as the loader's threads start); its result or error."""
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(work).result(60)


def test_a_thread_without_the_device_is_refused_until_it_binds_it(backend):
    """AscendCL's memory calls act on the calling thread's context, which a new thread lacks (the stand-in
    refuses as the runtime does); bind_thread gives it the device."""
    address = backend.reserve(G)
    handle = ctypes.c_void_p()
    with pytest.raises(MemoryBackendError) as excinfo:
        in_a_new_thread(lambda: backend.call("aclrtMallocPhysical", ctypes.byref(handle), G,
                                             ctypes.byref(device_prop()), 0))
    assert_refused(excinfo, "aclrtMallocPhysical", "ACL_ERROR_RT_CONTEXT_NULL", "the calling thread has no context")

    def bound_map():
        backend.bind_thread()
        physical = backend.create_physical(G)
        backend.map(address, G, physical)
        return physical

    physical = in_a_new_thread(bound_map)
    backend.unmap(address, G)
    backend.free_physical(physical)
    backend.release(address, G)


def test_the_loaders_threads_bind_the_device_before_they_map(backend, tiny, geometry):
    """A background load reads, maps and copies on the loader's own thread, over the stand-in."""
    from expertweave_ascend.host_tier import HostTier
    from expertweave_ascend.loader import BackgroundLoader
    from expertweave_ascend.weave import ExpertWeave, WeaveConfig

    handles = [memory_suite.GranuleSizedLayer(layer, backend.granularity) for layer in geometry.moe_layers]
    weave = ExpertWeave(geometry, handles, WeaveConfig(max_adapters=2, adapter_slots=16,
                                                       granularity=backend.granularity), backend=backend)
    loader = BackgroundLoader(weave, HostTier(1 << 30))
    try:
        loader.start("law", tiny / "adapters" / "law")
        loader.wait({"law"})
        loader.prefetch("math", tiny / "adapters" / "math")
        loader.start("math", tiny / "adapters" / "math")
        loader.wait({"math"})
        assert set(weave.adapters) == {"law", "math"}
    finally:
        loader.close()
        weave.close()


def test_the_recent_error_message_is_read_once(backend, shim):
    recent = ctypes.CDLL(str(shim)).aclGetRecentErrMsg  # the same loaded library, the same thread
    recent.restype = ctypes.c_char_p
    address = backend.reserve(G)
    with pytest.raises(MemoryBackendError) as excinfo:
        backend.call("aclrtUnmapMem", address)  # past the ledger, so the stand-in refuses it
    assert "nothing is mapped at" in str(excinfo.value)
    assert recent() is None, "the message the backend reported was left for the next failure"


# ----------------------------------------------------------------------------------------------
# loading the library

def assert_one_clear_error(excinfo, *parts: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    assert excinfo.value.__cause__ is None and excinfo.value.__suppress_context__, "the OSError shows through"


def test_a_missing_library_is_one_clear_error(tmp_path):
    missing = tmp_path / "libascendcl.so"
    with pytest.raises(MemoryBackendError) as excinfo:
        AclBackend(library=str(missing))
    assert_one_clear_error(excinfo, f"cannot load AscendCL from {missing}", "No such file",
                           acl_backend.LIBRARY_ENV, "set_env.sh")


def test_the_library_comes_from_the_environment(shim, tmp_path, monkeypatch):
    monkeypatch.setenv(acl_backend.LIBRARY_ENV, str(shim))
    backend = AclBackend(view=host_bytes)
    assert backend.library == str(shim)
    backend.close()
    monkeypatch.setenv(acl_backend.LIBRARY_ENV, str(tmp_path / "elsewhere.so"))
    with pytest.raises(MemoryBackendError) as excinfo:
        AclBackend(view=host_bytes)
    assert_one_clear_error(excinfo, str(tmp_path / "elsewhere.so"))


def test_a_library_without_the_virtual_memory_calls():
    libc = ctypes.util.find_library("c")
    with pytest.raises(MemoryBackendError) as excinfo:
        AclBackend(library=libc)
    assert str(excinfo.value) == (f"{libc} does not export aclrtMemGetAllocationGranularity, "
                                  f"an AscendCL virtual-memory call")


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed")
def test_without_a_view_only_torch_npu_can_view_the_memory(shim):
    """Production passes no view: the memory is NPU memory, which only torch_npu can view."""
    with pytest.raises(MemoryBackendError) as excinfo:
        AclBackend(library=str(shim))
    assert_one_clear_error(excinfo, f"{shim} is a real AscendCL but torch_npu is not importable")


# ----------------------------------------------------------------------------------------------
# on an Atlas server (scripts/validate_atlas.sh runs these; skipped elsewhere)

@on_npu
def test_npu_the_loaders_threads_map_and_fill_npu_memory(tiny, geometry):
    """A background load on the real libascendcl: the loader's thread binds the NPU, maps, and copies the
    experts into NPU memory, which then holds the adapter's weights."""
    from expertweave_ascend.host_tier import HostTier
    from expertweave_ascend.loader import BackgroundLoader
    from expertweave_ascend.weave import ExpertWeave, WeaveConfig

    backend = AclBackend(device_id=0)
    handles = [memory_suite.GranuleSizedLayer(layer, backend.granularity) for layer in geometry.moe_layers]
    weave = ExpertWeave(geometry, handles, WeaveConfig(max_adapters=2, adapter_slots=16,
                                                       granularity=backend.granularity),
                        backend=backend, device=backend.device)
    loader = BackgroundLoader(weave, HostTier(1 << 30))
    try:
        direct = weave.pack(tiny / "adapters" / "law")
        loader.start("law", tiny / "adapters" / "law")
        loader.wait({"law"})
        loaded = weave.adapters["law"]
        for layer, slots in loaded.slots.items():
            for name, view in weave.memory.views(layer).items():
                assert view.device.type == "npu"
                assert torch.equal(view[slots].cpu(), direct.weights[layer][name].cpu())
    finally:
        loader.close()
        weave.close()
        backend.close()


@on_npu
def test_npu_synchronize_waits_for_work_torch_npu_still_holds_in_its_task_queue(monkeypatch):
    """With TASK_QUEUE_ENABLE (vllm-ascend's default) torch_npu queues launches on the host; synchronize must
    return only once they have run."""
    monkeypatch.setenv("TASK_QUEUE_ENABLE", "1")
    backend = AclBackend(device_id=0)
    try:
        x = torch.randn(4096, 4096, device=backend.device)
        for _ in range(20):
            x = x @ x / 4096
        backend.synchronize()
        assert torch.npu.current_stream(backend.device).query(), "launched work still pending after synchronize"
    finally:
        backend.close()
