"""vLLM 0.32 on CUDA: expert memory in CUDA virtual memory on the runner's GPU, tables there too, and
vLLM's Triton fused MoE (the FlashInfer kernels it may prefer route inside the kernel, where no reroute
can reach)."""

import torch

from ....errors import ExpertWeaveError
from .vllm032 import Vllm032

# TritonExperts' moe_align_block_size takes fewer than 1024 experts once rounded up to 32.
MAX_EXPERT_SLOTS = 992


class VllmCuda(Vllm032):
    name = "CUDA"
    MODEL_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    REROUTABLE_KERNELS = ("TRITON",)
    REROUTE_TRACED = False
    kernel_advice = "start the engine with --moe-backend triton"
    shared_experts_refusal = ("adapters that tune shared experts are not served on CUDA yet: the per-token "
                              "selection is dynamic, and the CUDA graphs vLLM captures would replay it as it was "
                              "at capture (unverified on a GPU)")

    def engine_defaults(self, given: set[str]) -> dict:
        return {} if "moe_backend" in given else {"moe_backend": "triton"}

    def weave_device(self, runner) -> dict:
        from ....memory.cuda_backend import CudaBackend

        return {"backend": CudaBackend(runner.device.index or 0), "device": runner.device}

    def weave_installed(self, runner, weave) -> None:
        """The base experts moved from torch's allocator into CUDA virtual memory: give their old blocks
        back and take them out of the weights the KV-cache sizing subtracts (GPUWorker's
        determine_available_memory counts model_memory_usage and, apart, non-torch memory, where the
        virtual expert tensors now are)."""
        torch.cuda.empty_cache()
        runner.model_memory_usage -= weave.memory.base_expert_bytes

    def replace_expert_weight(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        if tensor.shape[0] > MAX_EXPERT_SLOTS:
            raise ExpertWeaveError(f"ExpertWeave on vLLM CUDA: {tensor.shape[0]} expert slots per MoE layer, but "
                                   f"vLLM's Triton fused MoE aligns at most {MAX_EXPERT_SLOTS}; lower "
                                   "--max-adapters or --adapter-slots")
        super().replace_expert_weight(layer, name, tensor)
