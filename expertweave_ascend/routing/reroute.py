"""The reroute operator: topk'[t, k] = table[token_adapter[t], topk[t, k]].

Registered once as the torch op `expertweave::reroute`, with a fake (meta) implementation so
torch.compile can trace through it. It is defined through torch.library.Library rather than the
`custom_op` decorator: the decorator's Python wrapper costs tens of microseconds per call, paid by
every MoE layer of every step. The default kernel is plain torch and runs on any device; CUDA (Triton)
and NPU (Ascend C) kernels register themselves for their dispatch key on top of it. Where the compiler
traces the MoE layer (vLLM's CPU engine), the engine calls no op: reroute_traced is traced into its graph.
"""

import torch

_lib = torch.library.Library("expertweave", "DEF")
_lib.define("reroute(Tensor topk_ids, Tensor token_adapter, Tensor table) -> Tensor")


def check_rows(topk_ids: torch.Tensor, token_adapter: torch.Tensor) -> None:
    if token_adapter.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"reroute: {token_adapter.shape[0]} adapter rows for {topk_ids.shape[0]} tokens")


def reroute_torch(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """topk_ids [T, k] base expert ids; token_adapter [T] table rows; table [rows, M] int32 slot ids."""
    check_rows(topk_ids, token_adapter)
    return table[token_adapter.unsqueeze(1), topk_ids].to(topk_ids.dtype)


_lib.impl("reroute", reroute_torch, "CompositeExplicitAutograd")


@torch.library.register_fake("expertweave::reroute")
def _(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    torch._check(token_adapter.shape[0] == topk_ids.shape[0])
    return torch.empty_like(topk_ids)


reroute = torch.ops.expertweave.reroute


def reroute_traced(topk_ids: torch.Tensor, token_rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The reroute as plain tensor code, for a compiled graph to trace and fuse beside the router instead of
    calling out to an op. token_rows is the engine's per-token buffer, at least T long, whose first T entries
    are this forward's tokens' rows; it and the table are read in place, so a graph traced once serves every
    step and every adapter loaded after it was traced."""
    return table[token_rows[:topk_ids.shape[0]].unsqueeze(1), topk_ids].to(topk_ids.dtype)


def reroute_reference(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The definition, written as plainly as possible; the kernels are tested against it."""
    out = torch.empty_like(topk_ids)
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            out[t, k] = table[int(token_adapter[t]), int(topk_ids[t, k])]
    return out
