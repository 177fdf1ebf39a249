"""MoELayerHandle over one vLLM fused-MoE layer."""

import torch

from ...memory import WeightSpec
from .engine import EnginePlatform


class VllmMoELayer:
    """runner: the engine's MoE layer module; api: this engine's platform."""

    def __init__(self, runner: torch.nn.Module, layer: int, api: EnginePlatform):
        self.runner = runner
        self.layer = layer
        self.api = api

    def weight_specs(self) -> list[WeightSpec]:
        module = self.api.expert_module(self.runner)
        return [WeightSpec("w13", tuple(module.w13_weight.shape[1:]), module.w13_weight.dtype),
                WeightSpec("w2", tuple(module.w2_weight.shape[1:]), module.w2_weight.dtype)]

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor) -> None:
        module = self.api.expert_module(self.runner)
        num_experts = module.w13_weight.shape[0]
        with torch.no_grad():
            views["w13"][:num_experts].copy_(module.w13_weight)
            views["w2"][:num_experts].copy_(module.w2_weight)
        self.api.replace_expert_weight(self.runner, "w13_weight", views["w13"])
        self.api.replace_expert_weight(self.runner, "w2_weight", views["w2"])
        self.table = table
        layer = self.layer
        self.api.reroute_topk(self.runner, lambda ids: torch.ops.expertweave.reroute_layer(ids, layer))

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        w13, w2 = self.api.pack_expert(self.runner, torch.cat([gate, up], dim=0), down)
        return {"w13": w13, "w2": w2}
