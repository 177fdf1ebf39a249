"""The Ascend C kernels in ascendc_kernels/, run on the CPU.

The kernel sources are compiled unchanged with g++ against tests/ascendc_host/kernel_operator.h, a host
functional model of the Ascend C API that enforces the unified-buffer capacity and the 32-byte rules of
GM <-> UB copies, and the harness there runs the kernel once per block index as blockDim vector cores
would. Launch plans come from ascendc_kernels/reroute_tiling.h, the same code the torch binding runs.
What this cannot show: that CANN's bisheng compiles the sources, that an NPU runs them, and how fast
(ascendc_kernels/README.md).
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from expertweave_ascend.integrations.ascend import kernels as ascend_kernels
from npu import on_npu
from expertweave_ascend.routing.reroute import reroute_reference, reroute_torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "ascendc_kernels"
HOST_DIR = ROOT / "tests" / "ascendc_host"
SOURCES = [KERNEL_DIR / "reroute.cpp", HOST_DIR / "harness.cpp", HOST_DIR / "probes.cpp"]
VECTOR_CORES = 40  # AIV cores of an ascend910b; the plan adapts to any count
UB_BYTES = 192 * 1024
ERROR_BYTES = 1024
SENTINEL = -7  # what the output holds before the kernel runs


class Violation(Exception):
    """The host model refused what the kernel did."""


class Plan:
    def __init__(self, tile_tokens: int, block_dim: int):
        self.tile_tokens = tile_tokens
        self.block_dim = block_dim


class Kernels:
    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        u32, u64, ptr, text = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p
        self.lib.ew_plan_reroute.argtypes = [u64, u64, u64, u64, u64, ctypes.POINTER(u32), ctypes.POINTER(u32),
                                             text, ctypes.c_size_t]
        self.lib.ew_reroute_ub_bytes.argtypes = [u64, u64, u64]
        self.lib.ew_reroute_ub_bytes.restype = u64
        self.lib.ew_max_table_entries.argtypes = [u64]
        self.lib.ew_max_table_entries.restype = u64
        self.lib.ew_run_reroute.argtypes = [ptr, ptr, ptr, ptr, u32, u32, u32, u32, u32, u32,
                                            ctypes.POINTER(u64), text, ctypes.c_size_t]
        self.lib.ew_probe_copy_ids.argtypes = [ptr, u32, text, ctypes.c_size_t]
        self.lib.ew_probe_reserve_ub.argtypes = [u32, text, ctypes.c_size_t]
        self.lib.ew_probe_gather.argtypes = [u32, u32, text, ctypes.c_size_t]

    @staticmethod
    def _check(rc: int, error) -> None:
        if rc != 0:
            raise Violation(error.value.decode())

    def plan(self, tokens: int, k: int, rows: int, experts: int, cores: int = VECTOR_CORES) -> Plan:
        tile, block_dim, error = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.create_string_buffer(ERROR_BYTES)
        self._check(self.lib.ew_plan_reroute(tokens, k, rows, experts, cores, ctypes.byref(tile),
                                             ctypes.byref(block_dim), error, ERROR_BYTES), error)
        return Plan(tile.value, block_dim.value)

    def ub_bytes(self, tile_tokens: int, k: int, table_entries: int) -> int:
        return self.lib.ew_reroute_ub_bytes(tile_tokens, k, table_entries)

    def max_table_entries(self, k: int) -> int:
        return self.lib.ew_max_table_entries(k)

    def run(self, topk: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor, tile_tokens: int,
            block_dim: int) -> tuple[torch.Tensor, int, int]:
        """The kernel's output (initialised to a sentinel), GM bytes read and GM bytes written."""
        for t in (topk, token_adapter, table):
            assert t.dtype == torch.int32 and t.is_contiguous()
        out = torch.full_like(topk, SENTINEL)
        gm = (ctypes.c_uint64 * 2)()
        error = ctypes.create_string_buffer(ERROR_BYTES)
        self._check(self.lib.ew_run_reroute(topk.data_ptr(), token_adapter.data_ptr(), table.data_ptr(),
                                            out.data_ptr(), topk.shape[0], topk.shape[1], table.shape[0],
                                            table.shape[1], tile_tokens, block_dim, gm, error, ERROR_BYTES), error)
        return out, gm[0], gm[1]

    def reroute(self, topk, token_adapter, table, cores: int = VECTOR_CORES) -> torch.Tensor:
        plan = self.plan(topk.shape[0], topk.shape[1], table.shape[0], table.shape[1], cores)
        return self.run(topk, token_adapter, table, plan.tile_tokens, plan.block_dim)[0]

    def probe_copy_ids(self, count: int) -> None:
        ids = torch.arange(count, dtype=torch.int32)
        error = ctypes.create_string_buffer(ERROR_BYTES)
        self._check(self.lib.ew_probe_copy_ids(ids.data_ptr(), count, error, ERROR_BYTES), error)

    def probe_gather(self, count: int, source_elements: int) -> None:
        error = ctypes.create_string_buffer(ERROR_BYTES)
        self._check(self.lib.ew_probe_gather(count, source_elements, error, ERROR_BYTES), error)

    def probe_reserve_ub(self, size: int) -> None:
        error = ctypes.create_string_buffer(ERROR_BYTES)
        self._check(self.lib.ew_probe_reserve_ub(size, error, ERROR_BYTES), error)



@pytest.fixture(scope="session")
def kernels(tmp_path_factory) -> Kernels:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        pytest.skip("no C++ compiler to build the kernels against the host model")
    library = tmp_path_factory.mktemp("ascendc_host") / "libascendc_host_kernels.so"
    build = subprocess.run([compiler, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC",
                            f"-I{HOST_DIR}", f"-I{KERNEL_DIR}", *map(str, SOURCES), "-o", str(library)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    return Kernels(library)


def random_case(tokens: int, k: int, rows: int, experts: int, seed: int):
    """Top-k base ids, each token's table row, and a table of slots among 4M (base and adapter copies)."""
    generator = torch.Generator().manual_seed(seed)
    topk = torch.randint(0, experts, (tokens, k), generator=generator, dtype=torch.int32)
    token_adapter = torch.randint(0, rows, (tokens,), generator=generator, dtype=torch.int32)
    table = torch.randint(0, 4 * experts, (rows, experts), generator=generator, dtype=torch.int32)
    return topk, token_adapter, table


@pytest.mark.parametrize("k", [1, 2, 6, 8])
@pytest.mark.parametrize("tokens", [1, 7, 8, 37, 129, 1000])
def test_reroute_matches_the_reference(kernels, tokens, k):
    topk, token_adapter, table = random_case(tokens, k, rows=9, experts=64, seed=tokens * 10 + k)
    assert torch.equal(kernels.reroute(topk, token_adapter, table), reroute_reference(topk, token_adapter, table))


@pytest.mark.parametrize("rows, experts", [(1, 1), (2, 16), (9, 160), (17, 256), (3, 7)])
def test_reroute_matches_the_reference_for_table_shapes(kernels, rows, experts):
    topk, token_adapter, table = random_case(45, 6, rows, experts, seed=rows + experts)
    assert torch.equal(kernels.reroute(topk, token_adapter, table), reroute_reference(topk, token_adapter, table))


def test_zero_tokens_launch_nothing_and_a_kernel_launched_anyway_touches_nothing(kernels):
    topk, token_adapter, table = random_case(0, 8, rows=9, experts=64, seed=0)
    assert kernels.plan(0, 8, 9, 64).block_dim == 0
    out, read, written = kernels.run(topk, token_adapter, table, tile_tokens=8, block_dim=4)
    assert out.shape == (0, 8) and (read, written) == (0, 0)


def test_one_token(kernels):
    topk, token_adapter, table = random_case(1, 8, rows=9, experts=64, seed=1)
    token_adapter[0] = 5
    plan = kernels.plan(1, 8, 9, 64)
    assert plan.block_dim == 1
    out = kernels.run(topk, token_adapter, table, plan.tile_tokens, plan.block_dim)[0]
    assert torch.equal(out[0], table[5][topk[0].long()])


# pads: the last block is not whole 32-byte units, so it moves by DataCopyPad rather than DataCopy.
@pytest.mark.parametrize("tokens, k, cores, pads", [(37, 6, 2, True), (1001, 2, 3, True), (205, 6, 40, True),
                                                    (13, 1, 1, True), (4099, 6, 4, True), (205, 8, 40, False)])
def test_last_block_shorter_than_a_tile(kernels, tokens, k, cores, pads):
    plan = kernels.plan(tokens, k, 9, 64, cores)
    tail = tokens % plan.tile_tokens
    assert tail != 0 and (tail * k * 4 % 32 != 0) == pads
    topk, token_adapter, table = random_case(tokens, k, rows=9, experts=64, seed=tokens)
    out = kernels.run(topk, token_adapter, table, plan.tile_tokens, plan.block_dim)[0]
    assert torch.equal(out, reroute_torch(topk, token_adapter, table))


@pytest.mark.parametrize("tokens, k", [(64, 8), (100, 6), (1, 2)])
def test_more_cores_than_blocks_leaves_the_extra_cores_idle(kernels, tokens, k):
    topk, token_adapter, table = random_case(tokens, k, rows=9, experts=64, seed=k)
    plan = kernels.plan(tokens, k, 9, 64)
    blocks = -(-tokens // plan.tile_tokens)
    out, read, written = kernels.run(topk, token_adapter, table, plan.tile_tokens, blocks + 7)
    assert torch.equal(out, reroute_torch(topk, token_adapter, table))
    # Only cores that own a block stage the table.
    assert read == tokens * k * 4 + tokens * 4 + blocks * table.numel() * 4
    assert written == tokens * k * 4


@pytest.mark.parametrize("tokens, k, rows, experts", [(1, 8, 9, 64), (64, 8, 9, 256), (8192, 8, 9, 256),
                                                      (8192, 6, 33, 64), (3, 2, 2, 7)])
def test_each_id_crosses_gm_once_each_way(kernels, tokens, k, rows, experts):
    """GM traffic, counted by the host model: ids and adapter rows read once, slots written once, and
    the table read once per core that works. The README's fused-vs-stock figures rest on this."""
    topk, token_adapter, table = random_case(tokens, k, rows, experts, seed=tokens + k)
    plan = kernels.plan(tokens, k, rows, experts)
    out, read, written = kernels.run(topk, token_adapter, table, plan.tile_tokens, plan.block_dim)
    assert torch.equal(out, reroute_torch(topk, token_adapter, table))
    assert read == tokens * (4 * k + 4) + plan.block_dim * rows * experts * 4
    assert written == tokens * 4 * k


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7, 8, 9, 12, 16, 32, 41, 55, 64])
def test_id_to_token_expansion_is_exact_at_the_largest_tile(kernels, k):
    """The kernel finds each id's token as floor((i + 0.5) / k) in float; a full-size tile exercises
    every index it will ever see for this k. For k = 41 and 55, floor(i * (1 / k)) without the half
    lands one token short at some multiples of k."""
    plan = kernels.plan(1 << 20, k, 9, 64, cores=1)
    assert plan.tile_tokens * k > 4096 - 8 * k
    tokens = 2 * plan.tile_tokens + 5
    topk, token_adapter, table = random_case(tokens, k, rows=9, experts=64, seed=k)
    out = kernels.run(topk, token_adapter, table, plan.tile_tokens, 1)[0]
    assert torch.equal(out, reroute_torch(topk, token_adapter, table))


def test_out_of_range_ids_and_rows_are_clamped_into_the_table(kernels):
    rows, experts = 9, 64
    topk, token_adapter, table = random_case(40, 8, rows, experts, seed=3)
    topk[0, 0], topk[1, 3], topk[2, 7] = experts, -1, 50 * experts
    token_adapter[3], token_adapter[4] = rows, -2
    out = kernels.reroute(topk, token_adapter, table)
    flat = token_adapter.long().unsqueeze(1) * experts + topk.long()
    assert torch.equal(out, table.reshape(-1)[flat.clamp(0, rows * experts - 1)])


@pytest.mark.parametrize("k", [1, 2, 6, 8])
def test_largest_table_fits_and_one_more_entry_is_refused_by_the_plan_and_by_the_model(kernels, k):
    largest = kernels.max_table_entries(k)
    # The smallest tile (8 tokens, 8k ids) takes 8 * 32k bytes: 2 buffers each of ids, rows (a tile of ids
    # long, as Gather's source) and slots, plus the expansion offsets and the lookup offsets.
    assert largest == (UB_BYTES - 8 * 32 * k) // 4
    topk, token_adapter, table = random_case(50, k, rows=1, experts=largest, seed=k)
    plan = kernels.plan(50, k, 1, largest)
    assert plan.tile_tokens == 8
    assert kernels.ub_bytes(8, k, largest) <= UB_BYTES
    out = kernels.run(topk, token_adapter, table, plan.tile_tokens, plan.block_dim)[0]
    assert torch.equal(out, reroute_torch(topk, token_adapter, table))

    with pytest.raises(Violation, match=f"at most {largest} fit the {UB_BYTES}-byte unified buffer"):
        kernels.plan(50, k, 1, largest + 1)
    bigger = torch.zeros(1, largest + 1, dtype=torch.int32)
    with pytest.raises(Violation, match=f"TPipe::InitBuffer: .* exceed the {UB_BYTES}-byte unified buffer"):
        kernels.run(topk, token_adapter, bigger, 8, plan.block_dim)


@pytest.mark.parametrize("k", [1, 2, 6, 8])
def test_the_engine_refuses_tables_by_the_kernels_own_limit(kernels, k):
    from expertweave_ascend.integrations.vllm.platforms import ascend

    assert ascend.max_table_entries(k) == kernels.max_table_entries(k)


def round_up_8(tokens: int) -> int:
    return -(-tokens // 8) * 8


def ub_bytes(tile: int, k: int, entries: int) -> int:
    """reroute.cpp's InitBuffer calls worked out by hand: the table (at least a tile of ids), then eight
    tile-of-ids buffers (ids, rows and slots twice each, expansion, offsets)."""
    ids = -(-tile * k * 4 // 32) * 32
    return -(-max(entries, tile * k) * 4 // 32) * 32 + 8 * ids


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000, 8192, 100_000])
@pytest.mark.parametrize("k", [1, 6, 8])
@pytest.mark.parametrize("entries", [9 * 64, 9 * 256, 40_000])
@pytest.mark.parametrize("cores", [1, 20, 40])
def test_plan_covers_every_token_within_the_unified_buffer(kernels, tokens, k, entries, cores):
    plan = kernels.plan(tokens, k, 1, entries, cores)
    table_bytes = -(-entries * 4 // 32) * 32
    even_share = round_up_8(-(-tokens // cores))
    # A core takes at least as many tokens as make its id traffic (8k + 4 bytes each) match the table
    # it stages, and at most what fits beside the table and 4096 ids.
    worth_a_core = round_up_8(-(-table_bytes // (8 * k + 4)))
    wanted = min(max(even_share, worth_a_core), 4096 // k // 8 * 8)
    fits = max(t for t in range(8, wanted + 1, 8) if ub_bytes(t, k, entries) <= UB_BYTES)
    assert plan.tile_tokens == fits
    assert kernels.ub_bytes(plan.tile_tokens, k, entries) <= UB_BYTES
    assert plan.block_dim == min(cores, -(-tokens // plan.tile_tokens))


@pytest.mark.parametrize("tokens, k, experts, tile_tokens, block_dim", [
    (64, 6, 64, 48, 2),      # DeepSeek-V2-Lite decode: a 2.3 KiB table is worth 48 tokens a core
    (64, 8, 256, 136, 1),    # DeepSeek-V3 decode: one core; the others would only copy its 9 KiB table
    (8192, 8, 256, 208, 40),  # a prefill chunk: every core
])
def test_plans_for_real_shapes(kernels, tokens, k, experts, tile_tokens, block_dim):
    plan = kernels.plan(tokens, k, 9, experts)
    assert (plan.tile_tokens, plan.block_dim) == (tile_tokens, block_dim)


@pytest.mark.parametrize("k, rows, experts, cores", [(0, 9, 64, 40), (8, 0, 64, 40), (8, 9, 0, 40), (8, 9, 64, 0)])
def test_plan_refuses_degenerate_shapes(kernels, k, rows, experts, cores):
    with pytest.raises(Violation, match="must all be positive"):
        kernels.plan(10, k, rows, experts, cores)


def test_model_refuses_a_datacopy_that_is_not_whole_32_byte_blocks(kernels):
    kernels.probe_copy_ids(16)
    with pytest.raises(Violation, match=r"DataCopy\(GM->UB\): 52 bytes is not a whole number of 32-byte blocks"):
        kernels.probe_copy_ids(13)


def test_model_refuses_a_gather_of_more_elements_than_its_source_holds(kernels):
    kernels.probe_gather(64, 64)
    with pytest.raises(Violation, match=r"Gather: src: 72 elements, the tensor holds 64"):
        kernels.probe_gather(72, 64)


def test_every_gather_of_the_kernel_reads_a_source_as_long_as_its_tile(kernels):
    """A tile of 6 ids a token over a table of 4 entries: the staged table is padded to the tile's ids."""
    topk, token_adapter, table = random_case(64, 6, rows=1, experts=4, seed=3)
    assert torch.equal(kernels.reroute(topk, token_adapter, table), reroute_torch(topk, token_adapter, table))
    assert kernels.ub_bytes(kernels.plan(64, 6, 1, 4).tile_tokens, 6, 4) == \
        ub_bytes(kernels.plan(64, 6, 1, 4).tile_tokens, 6, 4)


def test_model_refuses_more_unified_buffer_than_a_vector_core_has(kernels):
    kernels.probe_reserve_ub(UB_BYTES)
    with pytest.raises(Violation, match=f"TPipe::InitBuffer: {UB_BYTES + 32} more bytes .* exceed the {UB_BYTES}"):
        kernels.probe_reserve_ub(UB_BYTES + 1)


def test_loader_names_the_missing_library_and_how_to_point_at_one(monkeypatch, tmp_path):
    missing = tmp_path / "libexpertweave_ascend_ops.so"
    monkeypatch.setenv(ascend_kernels.LIBRARY_ENV, str(missing))
    monkeypatch.setattr(ascend_kernels, "_loaded", None)
    with pytest.raises(ascend_kernels.KernelLibraryMissing) as raised:
        ascend_kernels.load_kernels()
    assert str(missing) in str(raised.value) and ascend_kernels.LIBRARY_ENV in str(raised.value)
    assert "ascendc_kernels/README.md" in str(raised.value)


def test_loader_defaults_to_the_cmake_build_directory(monkeypatch):
    monkeypatch.delenv(ascend_kernels.LIBRARY_ENV, raising=False)
    assert ascend_kernels.library_path() == ROOT / "build" / "ascendc_kernels" / "libexpertweave_ascend_ops.so"


@on_npu
@pytest.mark.parametrize("k", [1, 2, 6, 8])
@pytest.mark.parametrize("tokens", [0, 1, 7, 37, 1000, 8192])
def test_npu_kernel_matches_the_reference(tokens, k):
    ascend_kernels.load_kernels()
    assert torch._C._dispatch_has_kernel_for_dispatch_key("expertweave::reroute", "PrivateUse1")
    topk, token_adapter, table = random_case(tokens, k, rows=9, experts=64, seed=tokens + k)
    out = torch.ops.expertweave.reroute(topk.npu(), token_adapter.npu(), table.npu())
    assert out.device.type == "npu" and out.dtype == torch.int32
    assert torch.equal(out.cpu(), reroute_torch(topk, token_adapter, table))


@on_npu
@pytest.mark.parametrize("k", [1, 8])
def test_npu_kernel_takes_the_largest_table_and_refuses_a_larger_one(kernels, k):
    ascend_kernels.load_kernels()
    largest = kernels.max_table_entries(k)
    topk, token_adapter, table = random_case(300, k, rows=1, experts=largest, seed=k)
    out = torch.ops.expertweave.reroute(topk.npu(), token_adapter.npu(), table.npu())
    assert torch.equal(out.cpu(), reroute_torch(topk, token_adapter, table))
    bigger = torch.zeros(1, largest + 1, dtype=torch.int32).npu()
    with pytest.raises(RuntimeError, match="unified buffer"):
        torch.ops.expertweave.reroute(topk.npu(), token_adapter.npu(), bigger)


@on_npu
def test_npu_kernel_refuses_mismatched_rows_like_the_torch_op():
    ascend_kernels.load_kernels()
    topk, _, table = random_case(3, 6, rows=2, experts=16, seed=0)
    with pytest.raises(ValueError, match="reroute: 2 adapter rows for 3 tokens"):
        torch.ops.expertweave.reroute(topk.npu(), torch.zeros(2, dtype=torch.int32).npu(), table.npu())
