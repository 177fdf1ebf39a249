"""The reroute op's CUDA kernel, in Triton: each program rewrites BLOCK consecutive (token, k) entries.

Registered for the CUDA dispatch key of `expertweave::reroute` when the routing package is imported on
a machine with CUDA and Triton. Like the Ascend C kernel, a table offset (row * M + id) outside the
table is clamped into it rather than read out of bounds. With TRITON_INTERPRET=1 it runs on CPU tensors,
which is how CI tests it.
"""

import torch
import triton
import triton.language as tl

from .reroute import _lib, check_rows

BLOCK = 1024


@triton.jit
def _reroute_kernel(topk_ptr, rows_ptr, table_ptr, out_ptr, entries, experts, table_entries,
                    K: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < entries
    ids = tl.load(topk_ptr + offsets, mask=mask, other=0).to(tl.int64)
    rows = tl.load(rows_ptr + offsets // K, mask=mask, other=0).to(tl.int64)
    flat = tl.minimum(tl.maximum(rows * experts + ids, 0), table_entries - 1)
    slots = tl.load(table_ptr + flat, mask=mask, other=0)
    tl.store(out_ptr + offsets, slots.to(out_ptr.dtype.element_ty), mask=mask)


def reroute_triton(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    check_rows(topk_ids, token_adapter)
    topk_ids, token_adapter, table = topk_ids.contiguous(), token_adapter.contiguous(), table.contiguous()
    out = torch.empty_like(topk_ids)
    entries = topk_ids.numel()
    if entries:
        _reroute_kernel[(triton.cdiv(entries, BLOCK),)](topk_ids, token_adapter, table, out, entries, table.shape[1],
                                                       table.numel(), K=topk_ids.shape[1], BLOCK=BLOCK)
    return out


def register_cuda() -> None:
    _lib.impl("reroute", reroute_triton, "CUDA")
