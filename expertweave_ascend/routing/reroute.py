"""The reroute operator: topk'[t, k] = table[token_adapter[t], topk[t, k]].

Registered once as the torch custom op `expertweave::reroute`, with a fake (meta) implementation so
torch.compile can trace through it. The default kernel is plain torch and runs on any device; CUDA
(Triton) and NPU (Ascend C) kernels register themselves for their device type on top of it.
"""

import torch


@torch.library.custom_op("expertweave::reroute", mutates_args=())
def reroute(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """topk_ids [T, k] base expert ids; token_adapter [T] table rows; table [rows, M] int32 slot ids."""
    num_experts = table.shape[1]
    flat = token_adapter.to(torch.int64).unsqueeze(1) * num_experts + topk_ids.to(torch.int64)
    return table.reshape(-1)[flat].to(topk_ids.dtype)


@reroute.register_fake
def _(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    torch._check(token_adapter.shape[0] == topk_ids.shape[0])
    return torch.empty_like(topk_ids)


def reroute_reference(topk_ids: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The definition, written as plainly as possible; the kernels are tested against it."""
    out = torch.empty_like(topk_ids)
    for t in range(topk_ids.shape[0]):
        for k in range(topk_ids.shape[1]):
            out[t, k] = table[int(token_adapter[t]), int(topk_ids[t, k])]
    return out
