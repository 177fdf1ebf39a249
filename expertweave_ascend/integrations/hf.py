"""transformers reference integration: DeepSeek-V2 with virtual expert tensors and per-token rerouting,
and the merged-model oracle that ExpertWeave's outputs are proven against.

transformers (5.x) keeps a MoE layer's experts fused: gate_up_proj [E, 2I, H] (gate rows, then up)
and down_proj [E, H, I]. Those are the slots' storage layout here.
"""

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import EsftAdapter
from ..contrastive import Contrastive, cold_choose, cold_scores
from ..memory import WeightSpec
from ..shared_experts import SharedExpertRows


class TokenAdapterRows:
    """Which table row each batch row uses; every token of a sequence shares its row's adapter."""

    def __init__(self):
        self.rows = torch.zeros(0, dtype=torch.int32)

    def per_token(self, batch: int, seq: int) -> torch.Tensor:
        if self.rows.numel() != batch:
            raise RuntimeError(f"adapter rows set for {self.rows.numel()} sequences, batch has {batch}")
        return self.rows.repeat_interleave(seq)


class ReroutedMoe(nn.Module):
    """DeepseekV2Moe whose top-k expert ids go through reroute before the experts run, and whose shared
    experts are the adapter's own for the rows of adapters that tune them."""

    def __init__(self, moe: nn.Module, table: torch.Tensor, adapter_rows: TokenAdapterRows,
                 shared_rows: SharedExpertRows, layer: int):
        super().__init__()
        self.moe = moe
        self.table = table
        self.adapter_rows = adapter_rows
        self.shared_rows = shared_rows
        self.layer = layer

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = hidden_states.shape
        _, topk_weights, topk_ids = self.moe.gate(hidden_states)
        token_adapter = self.adapter_rows.per_token(batch, seq).to(topk_ids.device)
        topk_ids = torch.ops.expertweave.reroute(topk_ids, token_adapter, self.table)
        flat = hidden_states.reshape(-1, hidden)
        routed = self.moe.experts(flat, topk_ids, topk_weights)
        shared = self.moe.shared_experts(hidden_states).reshape(-1, hidden)
        if self.shared_rows.active(self.layer):
            self.shared_rows.apply(self.layer, shared, flat, token_adapter, self.shared_forward)
        return (routed + shared).view(batch, seq, hidden)

    def shared_forward(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """DeepseekV2MLP's computation with an adapter's weights: down(act(gate x) * up x)."""
        act = self.moe.shared_experts.act_fn
        return F.linear(act(F.linear(x, weights["gate"])) * F.linear(x, weights["up"]), weights["down"])


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

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor, shared: SharedExpertRows) -> None:
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
        self.decoder_layer.mlp = ReroutedMoe(moe, table, self.adapter_rows, shared, self.layer)

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w13": torch.cat([gate, up], dim=0).to(self.dtype), "w2": down.to(self.dtype)}

    def pack_shared(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gate": gate.to(self.dtype), "up": up.to(self.dtype), "down": down.to(self.dtype)}


def load_model(base: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()


def moe_layer_handles(model: nn.Module) -> tuple[list[HfMoELayer], TokenAdapterRows]:
    rows = TokenAdapterRows()
    handles = [HfMoELayer(layer, i, rows) for i, layer in enumerate(model.model.layers)
               if hasattr(layer.mlp, "experts")]
    return handles, rows


def merge_adapter(model: nn.Module, adapter: EsftAdapter) -> nn.Module:
    """A copy of model with the adapter's tensors (routed experts, and shared experts and non-expert
    tensors where it tunes them) written over the base's: the ESFT merged model."""
    merged = copy.deepcopy(model)
    with torch.no_grad(), adapter.reading() as read:
        for layer, ids in adapter.experts.items():
            experts = merged.model.layers[layer].mlp.experts
            for e in ids:
                gate, up, down = read(layer, e)
                experts.gate_up_proj[e].copy_(torch.cat([gate, up], dim=0))
                experts.down_proj[e].copy_(down)
        for layer in adapter.shared_layers:
            mlp = merged.model.layers[layer].mlp.shared_experts
            for proj, weight in zip(("gate_proj", "up_proj", "down_proj"), read.shared(layer)):
                getattr(mlp, proj).weight.copy_(weight)
        state = merged.state_dict()
        for key, weight in read.non_expert().items():
            state[key].copy_(weight)
    return merged


@torch.no_grad()
def contrastive_tokens(adapter_model: nn.Module, base_model: nn.Module, prompt: list[int], count: int,
                       contrastive: Contrastive) -> list[int]:
    """The reference for contrastive decoding: greedy tokens of the CoLD rule (contrastive.py), the
    adapter's merged model and the base model each run in full on the sequence so far."""
    ids = torch.tensor([prompt])
    alpha, beta = torch.tensor([contrastive.alpha]), torch.tensor([contrastive.beta])
    out = []
    for _ in range(count):
        scores = cold_scores(adapter_model(input_ids=ids).logits[:, -1], base_model(input_ids=ids).logits[:, -1],
                             alpha, beta)
        token = int(cold_choose(scores, torch.zeros(1))[0])
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def model_nbytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
