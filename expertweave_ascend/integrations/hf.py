"""transformers reference integration: DeepSeek-V2 with virtual expert tensors and per-token rerouting,
and the merged-model oracle that ExpertWeave's outputs are proven against.

transformers (5.x) keeps a MoE layer's experts fused: gate_up_proj [E, 2I, H] (gate rows, then up)
and down_proj [E, H, I]. Those are the slots' storage layout here.
"""

import copy
from pathlib import Path

import torch
from torch import nn

from ..adapters import EsftAdapter
from ..memory import WeightSpec


class TokenAdapterRows:
    """Which table row each batch row uses; every token of a sequence shares its row's adapter."""

    def __init__(self):
        self.rows = torch.zeros(0, dtype=torch.int32)

    def per_token(self, batch: int, seq: int) -> torch.Tensor:
        if self.rows.numel() != batch:
            raise RuntimeError(f"adapter rows set for {self.rows.numel()} sequences, batch has {batch}")
        return self.rows.repeat_interleave(seq)


class ReroutedMoe(nn.Module):
    """DeepseekV2Moe whose top-k expert ids go through reroute before the experts run."""

    def __init__(self, moe: nn.Module, table: torch.Tensor, adapter_rows: TokenAdapterRows):
        super().__init__()
        self.moe = moe
        self.table = table
        self.adapter_rows = adapter_rows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        _, topk_weights, topk_ids = self.moe.gate(hidden_states)
        token_adapter = self.adapter_rows.per_token(batch, seq).to(topk_ids.device)
        topk_ids = torch.ops.expertweave.reroute(topk_ids, token_adapter, self.table)
        routed = self.moe.experts(hidden_states.reshape(-1, hidden), topk_ids, topk_weights)
        return routed.view(batch, seq, hidden) + self.moe.shared_experts(hidden_states)


class HfMoELayer:
    """MoELayerHandle over one transformers DeepSeek-V2 decoder layer."""

    def __init__(self, decoder_layer: nn.Module, layer: int, adapter_rows: TokenAdapterRows):
        self.decoder_layer = decoder_layer
        self.layer = layer
        self.adapter_rows = adapter_rows
        experts = decoder_layer.mlp.experts
        self.dtype = experts.gate_up_proj.dtype
        self.specs = [WeightSpec("w13", tuple(experts.gate_up_proj.shape[1:]), self.dtype),
                      WeightSpec("w2", tuple(experts.down_proj.shape[1:]), self.dtype)]

    def weight_specs(self) -> list[WeightSpec]:
        return self.specs

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor) -> None:
        moe = self.decoder_layer.mlp
        experts = moe.experts
        m = experts.num_experts
        with torch.no_grad():
            views["w13"][:m].copy_(experts.gate_up_proj)
            views["w2"][:m].copy_(experts.down_proj)
        del experts.gate_up_proj, experts.down_proj  # the views replace the parameters
        experts.gate_up_proj = views["w13"]
        experts.down_proj = views["w2"]
        experts.num_experts = views["w13"].shape[0]
        self.decoder_layer.mlp = ReroutedMoe(moe, table, self.adapter_rows)

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w13": torch.cat([gate, up], dim=0).to(self.dtype), "w2": down.to(self.dtype)}


def load_model(base: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()


def moe_layer_handles(model: nn.Module) -> tuple[list[HfMoELayer], TokenAdapterRows]:
    rows = TokenAdapterRows()
    handles = [HfMoELayer(layer, i, rows) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "experts")]
    return handles, rows


def merge_adapter(model: nn.Module, adapter: EsftAdapter) -> nn.Module:
    """A copy of model with the adapter's experts written over the base experts: the ESFT merged model."""
    merged = copy.deepcopy(model)
    with torch.no_grad(), adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            experts = merged.model.layers[layer].mlp.experts
            for e in ids:
                gate, up, down = read(layer, e)
                experts.gate_up_proj[e].copy_(torch.cat([gate, up], dim=0))
                experts.down_proj[e].copy_(down)
    return merged


def model_nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
