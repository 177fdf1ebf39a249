"""Times expertweave::reroute on an Ascend NPU: the Ascend C kernel against the op's plain torch kernel.

On an Atlas server, after building this directory (README.md):

    python ascendc_kernels/bench_reroute.py

Each shape is checked against the torch kernel first, then timed with NPU events over CALLS calls in a
row after a warm-up, so the figure includes torch_npu's per-call dispatch as a serving step pays it.
"""

import torch
import torch_npu  # noqa: F401

from expertweave_ascend.integrations.ascend.kernels import load_kernels
from expertweave_ascend.routing.reroute import reroute_torch

SHAPES = [(1, 6), (64, 6), (256, 8), (1024, 8), (8192, 8)]  # (tokens, k): decode batches up to a prefill chunk
ROWS, EXPERTS, CALLS, WARMUP = 9, 256, 200, 20


def microseconds_per_call(fn, *args) -> float:
    for _ in range(WARMUP):
        fn(*args)
    start, end = torch.npu.Event(enable_timing=True), torch.npu.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
        fn(*args)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / CALLS


def main() -> None:
    print(f"library: {load_kernels()}")
    print(f"{'tokens':>7} {'k':>2} {'ascend_c_us':>12} {'torch_us':>9}")
    for tokens, k in SHAPES:
        topk = torch.randint(0, EXPERTS, (tokens, k), dtype=torch.int32).npu()
        rows = torch.randint(0, ROWS, (tokens,), dtype=torch.int32).npu()
        table = torch.randint(0, 2 * EXPERTS, (ROWS, EXPERTS), dtype=torch.int32).npu()
        expected = reroute_torch(topk.cpu(), rows.cpu(), table.cpu())
        assert torch.equal(torch.ops.expertweave.reroute(topk, rows, table).cpu(), expected)
        kernel = microseconds_per_call(torch.ops.expertweave.reroute, topk, rows, table)
        composite = microseconds_per_call(reroute_torch, topk, rows, table)
        print(f"{tokens:>7} {k:>2} {kernel:>12.1f} {composite:>9.1f}")


if __name__ == "__main__":
    main()
