"""MoELayerHandle over one vLLM fused-MoE layer."""

import torch
import torch.nn.functional as F

from ...errors import ExpertWeaveError
from ...memory import WeightSpec
from ...shared_experts import SharedExpertRows
from .engine import EnginePlatform

SHARED_EXPERTS_REFUSAL = ("this engine was started without serving tuned shared experts (no adapter named at start "
                          "tunes them): start it with --shared-experts (ExpertWeaveLLM(shared_experts=True))")


HANDLE_ATTR = "_expertweave_layer"  # set on a woven MoE layer module: its VllmMoELayer


class VllmMoELayer:
    """runner: the engine's MoE layer module; api: this engine's platform; owner: the engine's weave on this
    worker (worker.WorkerWeave), which reroutes the layer's ids; shared_experts: whether the engine serves
    adapters that tune shared experts (engine_config)."""

    def __init__(self, runner: torch.nn.Module, layer: int, api: EnginePlatform, owner, shared_experts: bool = False):
        self.runner = runner
        self.layer = layer
        self.api = api
        self.owner = owner
        self.shared_experts = shared_experts

    def weight_specs(self) -> list[WeightSpec]:
        module = self.api.expert_module(self.runner)
        return [WeightSpec("w13", tuple(module.w13_weight.shape[1:]), module.w13_weight.dtype),
                WeightSpec("w2", tuple(module.w2_weight.shape[1:]), module.w2_weight.dtype)]

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor, shared: SharedExpertRows) -> None:
        module = self.api.expert_module(self.runner)
        num_experts = module.w13_weight.shape[0]
        with torch.no_grad():
            views["w13"][:num_experts].copy_(module.w13_weight)
            views["w2"][:num_experts].copy_(module.w2_weight)
        self.api.replace_expert_weight(self.runner, "w13_weight", views["w13"])
        self.api.replace_expert_weight(self.runner, "w2_weight", views["w2"])
        self.table = table
        # The ops find this handle, and so this engine's weave, on the layer module, which they reach by its
        # name in the forward context of the engine running them (as vLLM's own MoE op reaches the layer):
        # the traced graph holds only the name, the same in every engine serving the model. A traced reroute
        # reads the engine's tensors through the layer it wraps, which the graph is given per engine.
        setattr(self.runner, HANDLE_ATTR, self)
        name = self.runner.layer_name
        if self.api.REROUTE_TRACED:
            self.api.reroute_topk(self.runner, self.owner.traced_reroute(table))
        else:
            self.api.reroute_topk(self.runner, lambda ids: torch.ops.expertweave.reroute_layer(ids, name))
        if self.shared_experts:  # any op on the MLP's output changes how torch.compile rounds it
            self.api.serve_shared_experts(self.runner,
                                          lambda out, x: torch.ops.expertweave.shared_experts_rows(out, x, name))

    def reroute(self, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.owner.reroute(topk_ids, self.layer)

    def serve_shared(self, out: torch.Tensor, x: torch.Tensor) -> None:
        self.owner.shared_experts(out, x, self.layer)

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        w13, w2 = self.api.pack_expert(self.runner, torch.cat([gate, up], dim=0), down)
        return {"w13": w13, "w2": w2}

    def pack_shared(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        w13, w2 = self.api.pack_shared(self.runner, torch.cat([gate, up], dim=0), down)
        if not self.shared_experts:
            raise ExpertWeaveError(SHARED_EXPERTS_REFUSAL)
        return {"w13": w13, "w2": w2}

    @staticmethod
    def shared_forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """vLLM's DeepseekV2MLP with an adapter's weights: down(silu(gate x) * up x), this rank's part."""
        h = F.linear(x, weights["w13"])
        half = h.shape[-1] // 2
        return F.linear(F.silu(h[..., :half]) * h[..., half:], weights["w2"])
