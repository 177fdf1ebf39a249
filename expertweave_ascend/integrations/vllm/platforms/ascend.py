"""Every vllm-ascend 0.23.0.post1 detail ExpertWeave's NPU path relies on, and nothing else.

VllmAscend implements the engine interface (engine.py) on vllm-ascend's NPU platform; platforms.current()
picks it there. Its vLLM half (the runner seams, the scheduler and front-end facts) is vLLM 0.23's
(vllm023.py), which the 0.23 suite runs on the CPU. The vllm-ascend half below was written against the
pinned source release (requirements-ascend.txt, fetched by tests/pinned.py) and is NOT YET RUN ON ASCEND
HARDWARE: tests/test_vllm_ascend_hooks.py checks every name this class looks up (and
tests/vllm_ascend_facts.py: every assumption about the bodies behind them) against those sources and runs
the pure parts (packing, token layout) on CPU tensors; scripts/validate_atlas.sh runs the rest on an
Atlas server. File paths in the table are relative to the vllm_ascend package.

| what                   | vllm-ascend 0.23.0.post1 file: function (vLLM 0.23)                  | ExpertWeave        |
| ---------------------- | -------------------------------------------------------------------- | ------------------ |
| MoE layer module       | ops/fused_moe/fused_moe_0_23_0.py: AscendFusedMoE (1)                 | iter_moe_layers    |
| where top-k ids appear | ops/fused_moe/fused_moe.py: AscendUnquantizedFusedMoEMethod.apply -> select_experts (2) | reroute_topk |
| EPLB id map            | ops/fused_moe/moe_comm_method.py: MoECommMethod.fused_experts, log2phy[topk_ids] | after rerouting |
| expert weights         | ops/fused_moe/fused_moe.py: process_weights_after_loading (3)         | pack_expert        |
| TP shard of an expert  | vLLM FusedMoE weight loader, moe_config.tp_rank / tp_size (4)         | shard_transposed   |
| expert count dispatch sees | ops/fused_moe/token_dispatcher.py: TokenDispatcherWithAllGather.num_experts_local (5) | reroute_topk |
| EP expert maps         | eplb/core/eplb_utils.py: init_eplb_config (6)                         | EP refused         |
| tokens at select_experts | ops/fused_moe/prepare_finalize.py: PrepareAndFinalizeWithAllGather.prepare (7) | moe_token_rows |
| process-wide patches   | __init__.py: _ensure_global_patch, as vllm-ascend's own plugins call it | patch_model_runner |
| model loaded           | worker/model_runner_v1.py: NPUModelRunner.load_model, get_model       | patch_model_runner |
| KV-cache sizing        | worker/worker.py: NPUWorker.determine_available_memory, model_memory_usage | weave_installed |
| per-step token layout  | worker/model_runner_v1.py: NPUModelRunner._prepare_inputs (8)         | patch_model_runner |
| request scheduled/finished | worker/model_runner_v1.py: NPUModelRunner.execute_model: scheduled_new_reqs, finished_req_ids | patch_model_runner |
| per-request data       | SamplingParams.extra_args, runner.requests[id].sampling_params        | engine.py          |
| expert memory          | ours: AscendCL VMM (expertweave_ascend/memory/acl_backend.py)         | weave_device       |

(1) Imported into ops/fused_moe/fused_moe.py when vLLM is 0.23.0; at `model.layers[i].mlp.experts`.
(2) `apply` calls its module's `select_experts` (from ops/fused_moe/experts_selector.py) on the
    tokens `prepare` laid out; ExpertWeave wraps `apply` to know the layer and rebinds that module's
    `select_experts` to reroute the ids it returns, so rerouting comes before EPLB and dispatch.
(3) w13 [E, H, 2I/tp] (gate then up) and w2 [E, I/tp, H], transposed after loading; ND unless
    weight_nz_mode=2 or enable_fused_mc2 casts them to NZ. ExpertWeave keeps them ND and refuses NZ.
(4) TP rank r holds rows [r*I/tp, (r+1)*I/tp) of gate and of up and those columns of down; without
    EP the TP group spans DP too (flattened rank).
(5) Without EP it is both `expert_num` and the end of `active_expert_range` of npu_moe_init_routing
    (torch_npu.npu_moe_init_routing_v2 on A5, vllm-ascend's npu_moe_init_routing_custom on A2/A3).
    One dispatcher serves every layer (`_MoECommMethods`, ops/fused_moe/moe_comm_method.py), so it is
    set to the layer's M + S slots only while a woven layer runs `apply`.
(6) None without EP. With EP rank r owns global ids [r*E/ep, (r+1)*E/ep), and MC2 / all-to-all send
    id to rank id // (E/ep).
(7) Without SP each DP rank's tokens are padded to `max_tokens_across_dp` and all-gathered over DP
    (`_prepare_with_dp_group`); with SP (flashcomm1) `maybe_all_gather_and_maybe_unpad`
    (ops/register_custom_ops.py) gathers them and, with DP, cuts rank i's `padded_length` block to
    `num_tokens_across_dp_cpu[i]`. Each token's adapter row takes the same padding and DP all-gather
    (MoETokenLayout).
(8) Writes `query_start_loc.np`, inside `execute_model`'s `synchronize_input_prep()`, which also
    guards ExpertWeave's pinned host rows until their non-blocking copy to the NPU is done.

Refused with one clear error when the engine loads, before anything is mapped: expert parallelism
(dispatch needs each rank's experts to be one contiguous block of global ids, so an adapter's copy of
expert j must sit in a block of the EP rank owning j, laid out [r*(E/ep + S), (r+1)*(E/ep + S)); the
core numbers a layer's adapter slots M..M+S-1 for the whole layer), prefill context parallelism
(tokens are also gathered over PCP), quantized MoE layers (their `apply` selects experts elsewhere),
NZ expert weights, and data parallelism (until it can be tested: adapter loads, unloads and request
counts are answered by one engine, while every engine's MoE layers need the same adapters).
"""

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from ....errors import ExpertWeaveError
from ..engine import checked_moe_layers, scheduler_flags, shard_expert
from ..patching import lookup, replace_method
from .vllm023 import Vllm023

ACL_FORMAT_ND = 2  # aclFormat in acl/acl_base_rt.h
# npu_moe_init_routing_custom takes expert ids up to 10240, 5120 in its key-value count mode
# (csrc/moe/moe_init_routing_custom/op_host/moe_init_routing_custom_tiling.cpp: KV_MODE_EXPERT_IDX_MAX):
# the smaller bounds a layer's M + S slots, whichever mode the dispatcher picks.
ROUTING_MAX_EXPERTS = 5120
# ascendc_kernels/reroute_tiling.h MaxTableEntries: a vector core's 192 KiB unified buffer less the
# smallest tile (8 tokens of top-k ids, eight buffers of them), in int32 table entries.
REROUTE_UB_BYTES = 192 * 1024
REROUTE_ATTR = "_expertweave_reroute"  # set on a woven AscendFusedMoE: its ids -> slot ids

_MOE = "vllm_ascend.ops.fused_moe.fused_moe"


class VllmAscend(Vllm023):
    """Every vllm-ascend name this class looks up is one of these "module:qualname" targets."""
    name = "vllm-ascend"
    DEVICE_TYPE = "npu"  # vllm-ascend's NPUPlatform.device_type, which platforms.current() looks for
    REROUTE_TRACED = False
    MODEL_RUNNER = "vllm_ascend.worker.model_runner_v1:NPUModelRunner"
    GET_MODEL = "get_model"
    MOE_LAYER = f"{_MOE}:AscendFusedMoE"
    MOE_METHOD = f"{_MOE}:AscendUnquantizedFusedMoEMethod"
    MOE_APPLY = f"{MOE_METHOD}.apply"
    SELECT_EXPERTS = f"{_MOE}:select_experts"
    ENABLE_SP = "vllm_ascend.utils:enable_sp"
    GET_ASCEND_CONFIG = "vllm_ascend.ascend_config:get_ascend_config"
    GLOBAL_PATCH = "vllm_ascend:_ensure_global_patch"

    def engine_defaults(self, given: set[str]) -> dict:
        return {}

    def engine_environment(self) -> dict:
        """None: vllm-ascend's NPUWorker always builds the V1 runner on vLLM 0.23."""
        return {}

    # -- the model runner -----------------------------------------------------------------------------
    def before_runner_import(self) -> None:
        """vllm-ascend's own general plugins apply its process-wide patches of vLLM before anything imports
        its model runner; they are applied the same way (once) in case they have not run yet."""
        lookup(self.GLOBAL_PATCH)()

    def loaded_model(self, runner) -> torch.nn.Module:
        """The model itself, out of the ACL graph wrapper."""
        return getattr(runner, self.GET_MODEL)()

    def weave_device(self, runner) -> dict:
        """AscendCL virtual memory on the runner's NPU, tables there too; the NPU reroute kernel is
        loaded first."""
        from ....memory.acl_backend import AclBackend
        from ...ascend.kernels import load_kernels

        load_kernels()
        return {"backend": AclBackend(runner.device.index), "device": runner.device}

    def weave_installed(self, runner, weave) -> None:
        """The base experts moved from torch's allocator into AscendCL virtual memory: give their old
        blocks back to the device and take them out of the weights the KV-cache sizing subtracts
        (NPUWorker.determine_available_memory counts model_memory_usage and, apart, non-torch memory,
        where the virtual expert tensors now are)."""
        import torch_npu

        torch_npu.npu.empty_cache()
        runner.model_memory_usage -= weave.memory.base_expert_bytes

    # -- engine options and MoE layers ----------------------------------------------------------------
    def check_engine(self, runner, max_adapters: int) -> None:
        super().check_engine(runner, max_adapters)
        check_options(runner.vllm_config.model_config.hf_config, lookup(self.GET_ASCEND_CONFIG)(), max_adapters)

    def iter_moe_layers(self, model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        return checked_moe_layers(self, model, lookup(self.MOE_LAYER))

    def check_layer(self, index: int, layer: torch.nn.Module) -> None:
        import torch_npu

        where = f"ExpertWeave on vllm-ascend, MoE layer {index}"
        moe = layer.moe_config
        if layer.mix_placement:
            raise ExpertWeaveError(f"{where}: mix_placement puts the shared experts in the rows the adapter slots "
                                   "take")
        if moe.ep_size > 1:
            raise ExpertWeaveError(f"{where}: expert parallelism (EP {moe.ep_size}) is not supported: its dispatch "
                                   "needs every adapter expert on the EP rank of its base expert; serve with TP")
        if moe.pcp_size > 1:
            raise ExpertWeaveError(f"{where}: prefill context parallelism (PCP {moe.pcp_size}) is not supported")
        if moe.dp_size > 1:
            raise ExpertWeaveError(f"{where}: data parallelism (DP {moe.dp_size}) is not supported: every engine's "
                                   "MoE layers would need the same adapters, but adapter loads, unloads and "
                                   "request counts are answered by one engine; serve one engine per device behind "
                                   "a load balancer, or with TP")
        if type(layer.quant_method) is not lookup(self.MOE_METHOD):
            raise ExpertWeaveError(f"{where}: only unquantized MoE layers are supported, "
                                   f"this one uses {type(layer.quant_method).__name__}")
        for name in ("w13_weight", "w2_weight"):
            fmt = torch_npu.get_npu_format(getattr(layer, name))
            if fmt != ACL_FORMAT_ND:
                raise ExpertWeaveError(f"{where}: {name} is in NPU format {fmt}, not ND (2); ExpertWeave keeps "
                                       "expert weights ND: leave weight_nz_mode below 2 and enable_fused_mc2 off")

    def expert_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        """AscendFusedMoE owns w13_weight / w2_weight itself."""
        return layer

    def replace_expert_weight(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """As process_weights_after_loading installs its transposed weights: a new frozen Parameter."""
        if tensor.shape[0] > ROUTING_MAX_EXPERTS:
            raise ExpertWeaveError(f"ExpertWeave on vllm-ascend: {tensor.shape[0]} expert slots per MoE layer, "
                                   f"but npu_moe_init_routing takes at most {ROUTING_MAX_EXPERTS}; lower "
                                   "--max-adapters or --adapter-slots")
        setattr(layer, name, torch.nn.Parameter(tensor, requires_grad=False))

    def pack_expert(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        moe = layer.moe_config
        w13, w2 = shard_transposed(w13, w2, moe.tp_rank, moe.tp_size)
        return w13.to(layer.w13_weight.dtype), w2.to(layer.w2_weight.dtype)

    def serve_shared_experts(self, layer: torch.nn.Module, hook: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Not yet: vllm-ascend runs shared experts inside its own MoE paths (and ACL graphs would replay
        the per-token selection as captured); pack_shared refuses such adapters."""

    def non_expert_variants_refusal(self, runner) -> str | None:
        """Served where the engine runs ExpertWeave's scheduler synchronously (grouping.py gives each step one
        variant; the switch happens before the step it is for) and eagerly (an ACL graph would replay the
        non-expert weights it captured); vllm-ascend's defaults are neither. Unverified on hardware:
        tests/test_npu_serving.py, which scripts/validate_atlas.sh runs, serves such an adapter there."""
        flags = scheduler_flags(runner.vllm_config)
        if not runner.vllm_config.model_config.enforce_eager:
            flags.append("--enforce-eager")
        if not flags:
            return None
        return f"on vllm-ascend such adapters need the engine started with {' '.join(flags)}"

    def pack_shared(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise ExpertWeaveError("ExpertWeave on vllm-ascend: adapters that tune shared experts are not served on "
                               "the NPU yet (served on vLLM CPU and in the transformers engine)")

    # -- rerouting --------------------------------------------------------------------------------------
    def reroute_topk(self, layer: torch.nn.Module, reroute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Also makes the layer's dispatch count every slot of its (enlarged) expert tensors. The reroute is
        the layer's own (an engine's): woven_apply finds it on the layer and gives it to select_experts for
        the length of that call only, so the process-wide wrappers hold nothing of any engine."""
        replace_method(self.MOE_APPLY, woven_apply)
        replace_method(self.SELECT_EXPERTS, rerouted_select)
        setattr(layer, REROUTE_ATTR, reroute)

    def moe_token_rows(self, token_adapter: torch.Tensor, num_selected: int) -> torch.Tensor:
        """From this rank's per-token rows (the runner's token order, zero beyond the step's tokens), laid
        out as AllGather's prepare lays out the tokens."""
        layout = self.token_layout(num_selected)
        rows = rank_rows(token_adapter, layout)
        if layout.dp_size > 1:
            from vllm.distributed import get_dp_group

            rows = get_dp_group().all_gather(rows, 0)
        rows = assemble_rows(rows, layout)
        if rows.shape[0] != num_selected:
            raise ExpertWeaveError(f"ExpertWeave on vllm-ascend: the MoE layer selected experts for {num_selected} "
                                   f"tokens, the token layout {layout} gives {rows.shape[0]}")
        return rows

    def token_layout(self, num_selected: int) -> "MoETokenLayout":
        """The layout AllGather's prepare gives the tokens of the current forward (no EP, no PCP)."""
        from vllm.distributed import get_dp_group
        from vllm.forward_context import get_forward_context

        dp_size = get_dp_group().world_size
        if dp_size == 1:
            return MoETokenLayout(num_selected)
        context = get_forward_context()
        if lookup(self.ENABLE_SP)():
            if not context.flash_comm_v1_enabled:
                return MoETokenLayout(num_selected)
            counts = tuple(int(n) for n in context.dp_metadata.num_tokens_across_dp_cpu)
            return MoETokenLayout(int(context.padded_length), dp_size, counts)
        return MoETokenLayout(int(context.max_tokens_across_dp), dp_size)


# The reroute of the woven layer whose apply is running in this context (None outside one): select_experts
# is a module function called from apply without the layer.
_rerouting: ContextVar[Callable[[torch.Tensor], torch.Tensor] | None] = ContextVar("expertweave_rerouting",
                                                                                    default=None)


@contextmanager
def rerouting(reroute: Callable[[torch.Tensor], torch.Tensor]):
    """select_experts reroutes its ids with reroute while this lasts (in this thread or task)."""
    token = _rerouting.set(reroute)
    try:
        yield
    finally:
        _rerouting.reset(token)


def woven_apply(original: Callable) -> Callable:
    def apply(self, layer, *args, **kwargs):
        reroute = getattr(layer, REROUTE_ATTR, None)
        if reroute is None:
            return original(self, layer, *args, **kwargs)
        from vllm.forward_context import get_forward_context

        dispatcher = get_forward_context().moe_comm_method.token_dispatcher
        count = dispatcher.num_experts_local
        dispatcher.num_experts_local = layer.w13_weight.shape[0]
        try:
            with rerouting(reroute):
                return original(self, layer, *args, **kwargs)
        finally:
            dispatcher.num_experts_local = count
    return apply


def rerouted_select(original: Callable) -> Callable:
    def select_experts(*args, **kwargs):
        weights, ids = original(*args, **kwargs)
        reroute = _rerouting.get()
        if reroute is None:
            return weights, ids
        return weights, reroute(ids)
    return select_experts


def max_table_entries(top_k: int) -> int:
    """The largest [rows, M] table the Ascend C reroute kernel stages (reroute_tiling.h MaxTableEntries)."""
    return (REROUTE_UB_BYTES - 8 * 32 * top_k) // 4


def check_options(hf_config, ascend_config, max_adapters: int) -> None:
    """vllm-ascend's options that break the slot layout (vLLM's own: Vllm023.check_engine)."""
    where = "ExpertWeave on vllm-ascend"
    if getattr(ascend_config, "mix_placement", False):
        raise ExpertWeaveError(f"{where}: mix_placement puts the shared experts after the routed ones, in the rows "
                               "the adapter slots take; start without it")
    prefetch = ascend_config.weight_prefetch_config
    moe_ratios = prefetch.prefetch_ratio.get("moe", {}) or {"gate_up": 0.8}  # vllm-ascend's default
    if prefetch.enabled and any(ratio > 0 for ratio in moe_ratios.values()):
        raise ExpertWeaveError(f"{where}: weight prefetch of MoE weights reads a share of the enlarged w13, adapter "
                               "slots no adapter holds included; set weight_prefetch_config's moe ratios to 0 or "
                               "disable it")
    experts, top_k = hf_config.n_routed_experts, hf_config.num_experts_per_tok
    rows = max_adapters + 1
    if rows * experts > max_table_entries(top_k):
        raise ExpertWeaveError(f"{where}: {max_adapters} adapters make a routing table of {rows} x {experts} "
                               f"entries; the Ascend C reroute kernel stages at most {max_table_entries(top_k)} at "
                               f"top-{top_k}: lower --max-adapters")


def shard_transposed(w13: torch.Tensor, w2: torch.Tensor, tp_rank: int, tp_size: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert as TP rank tp_rank of tp_size holds it in vllm-ascend: vLLM's shard (shard_expert),
    transposed, [H, 2I/tp] and [I/tp, H], both contiguous (ND)."""
    w13, w2 = shard_expert(w13, w2, tp_rank, tp_size)
    return w13.t().contiguous(), w2.t().contiguous()


# -- each token's adapter row, laid out as the MoE layer's tokens are ----------------------------------
@dataclass(frozen=True)
class MoETokenLayout:
    """How the tokens a MoE layer selects experts for come from the DP ranks' tokens: each rank
    contributes its first pad_to tokens (zero-padded), the contributions are all-gathered over DP in
    rank order, and then `kept[i]` tokens are kept from rank i's block (None: all of them)."""
    pad_to: int
    dp_size: int = 1
    kept: tuple[int, ...] | None = None


def rank_rows(rows: torch.Tensor, layout: MoETokenLayout) -> torch.Tensor:
    """This rank's contribution: its per-token adapter rows, cut or zero-padded (row 0, the base) to pad_to."""
    part = rows[: layout.pad_to]
    if part.shape[0] == layout.pad_to:
        return part
    return torch.nn.functional.pad(part, (0, layout.pad_to - part.shape[0]))


def assemble_rows(gathered: torch.Tensor, layout: MoETokenLayout) -> torch.Tensor:
    """The MoE layer's token rows from the DP all-gather of every rank's contribution."""
    if layout.kept is None:
        return gathered
    blocks = gathered.view(layout.dp_size, layout.pad_to)
    return torch.cat([blocks[i, :count] for i, count in enumerate(layout.kept)])
