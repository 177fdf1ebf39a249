"""Reroute's share of one MoE layer's time on this CPU, at DeepSeek-V2-Lite shapes, 1..256 tokens.

The layer is what vLLM's CPU backend runs for a DeepSeek-V2 MoE layer: router linear and top-6 softmax,
`cpu_fused_moe` over an expert tensor of 64 base + S adapter slots (prepacked as the engine prepacks
them), and the two shared experts. Top-k ids replay real DeepSeek-V2-Lite routing (the law trace of the
layer); tokens are spread round robin over the base row and three real adapters' rows, so rerouted ids
land in adapter slots as in serving. Timed with torch.utils.benchmark; the share is
reroute / (MoE layer + reroute).
"""

import torch
from torch.utils import benchmark

from expertweave_ascend.routing import RoutingTables, reroute
from expertweave_ascend.weave import slots_needed

from .esft_data import TOP_K, adapter_geometries, router_trace

HIDDEN, INTERMEDIATE, EXPERTS, SHARED = 2048, 1408, 64, 2
TRACE_LAYER = 12


class CpuMoeLayer:
    """One routed + shared expert layer as vLLM 0.32 computes it on CPU (bf16, cpu_fused_moe)."""

    def __init__(self, slots: int, isa: str):
        from vllm._custom_ops import cpu_prepack_moe_weight

        g = torch.Generator().manual_seed(0)
        rand = lambda *shape: (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)  # noqa: E731
        self.isa = isa
        self.gate = rand(EXPERTS, HIDDEN)
        self.w13 = cpu_prepack_moe_weight(rand(slots, 2 * INTERMEDIATE, HIDDEN), isa)
        self.w2 = cpu_prepack_moe_weight(rand(slots, HIDDEN, INTERMEDIATE), isa)
        self.shared_up = rand(2 * SHARED * INTERMEDIATE, HIDDEN)
        self.shared_down = rand(HIDDEN, SHARED * INTERMEDIATE)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        from vllm._custom_ops import cpu_fused_moe

        weights = torch.softmax(torch.nn.functional.linear(x, self.gate).float(), dim=-1)
        topk_weights, _ = torch.topk(weights, TOP_K, dim=-1)  # the router's own ids are replaced by the trace
        out = torch.empty_like(x)
        cpu_fused_moe(out, x, self.w13, self.w2, None, None, topk_weights, topk_ids, "silu", self.isa)
        gate, up = torch.nn.functional.linear(x, self.shared_up).chunk(2, dim=-1)
        return out + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.shared_down)


def cpu_isa() -> str:
    return "amx" if torch.cpu._is_amx_tile_supported() else "vec"


def adapter_table(device: torch.device | str = "cpu") -> tuple[dict, int, torch.Tensor]:
    """Three real adapters' rows of TRACE_LAYER's table, their experts packed after the base's:
    (adapters, adapter slots, table [4, EXPERTS])."""
    adapters = adapter_geometries(3)
    layer = TRACE_LAYER
    slots = slots_needed(adapters.values(), [layer])
    tables = RoutingTables([layer], EXPERTS, len(adapters), device)
    next_slot = EXPERTS
    for row, experts in enumerate(adapters.values(), start=1):
        mapping = {}
        for e in experts[layer]:
            mapping[e] = next_slot
            next_slot += 1
        tables.write_row(row, {layer: mapping})
    return adapters, slots, tables.layer(layer)


def measure(token_counts: list[int], min_run_time: float) -> dict:
    adapters, slots, table = adapter_table()
    layer = TRACE_LAYER
    moe = CpuMoeLayer(EXPERTS + slots, cpu_isa())
    trace = router_trace("law", layer)
    g = torch.Generator().manual_seed(1)
    rows = []
    for tokens in token_counts:
        x = (torch.randn(tokens, HIDDEN, generator=g)).to(torch.bfloat16)
        topk = trace[:tokens].contiguous()
        token_adapter = (torch.arange(tokens) % (len(adapters) + 1)).to(torch.int32)
        rerouted = reroute(topk, token_adapter, table)
        env = {"moe": moe, "x": x, "ids": rerouted, "topk": topk, "rows": token_adapter, "table": table,
               "reroute": reroute}
        layer_s = benchmark.Timer("moe(x, ids)", globals=env).blocked_autorange(min_run_time=min_run_time).median
        reroute_s = benchmark.Timer("reroute(topk, rows, table)", globals=env) \
            .blocked_autorange(min_run_time=min_run_time).median
        rows.append({"tokens": tokens, "moe_layer_us": layer_s * 1e6, "reroute_us": reroute_s * 1e6,
                     "share": reroute_s / (layer_s + reroute_s)})
    return {"shape": {"hidden": HIDDEN, "expert_intermediate": INTERMEDIATE, "base_experts": EXPERTS,
                      "adapter_slots": slots, "top_k": TOP_K, "shared_experts": SHARED, "dtype": "bf16",
                      "isa": moe.isa, "trace": f"law, layer {layer}", "adapters": list(adapters)},
            "rows": rows}
