"""What an engine platform provides ExpertWeave, and the conventions every vLLM line shares.

One class per platform implements EnginePlatform (platforms/: vLLM 0.32 on the CPU and on CUDA, vLLM 0.23
on the CPU, vllm-ascend 0.23 on the NPU); platforms.current() picks it once per process, by device and vLLM
version. The worker, the MoE layer
handle and the plugin call only what this protocol names, so everything that differs between vLLM lines
and devices lives in one platform class.
"""

from typing import Callable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

from ...adapters import validate_adapter
from ...errors import ExpertWeaveError
from ...geometry import BaseGeometry
from ...sharing import check_rel_l2
from ...weave import slots_needed

ADAPTER_ARG = "esft_adapter"  # key of SamplingParams.extra_args naming a request's adapter
# vLLM's prefix cache keys blocks by the request's cache_salt: an adapter's requests carry a salt made
# from its content hash, so adapters never share blocks unless their bytes are the same, and a client's
# own salt (per-tenant isolation) is kept in front of it. Clients may not use the marker themselves.
SALT_MARKER = "~esft:"
SALT_HASH_CHARS = 32  # 128 bits of the adapter's sha256
MAX_CACHE_SALT = 128  # vLLM's validate_cache_salt bound
# EngineArgs options that set how many data-parallel engines vLLM runs (VLLM_DP_SIZE, where they do not)
DATA_PARALLEL_SIZES = ("data_parallel_size", "data_parallel_size_local")

# vLLM's scheduler_cls (scheduler.py): a step holds one non-expert variant (grouping.py), contrastive
# requests run with their base twins (pairing.py)
SCHEDULER = "expertweave_ascend.integrations.vllm.scheduler.ExpertWeaveScheduler"
# vLLM's worker_extension_cls: imported by vLLM in the engine's worker processes only (worker.py)
WORKER_EXTENSION = "expertweave_ascend.integrations.vllm.worker.ExpertWeaveWorkerExtension"

OnLoad = Callable[[object], None]  # (model runner) after the model is loaded, before warm-up
OnSchedule = Callable[[object, object], None]  # (model runner, scheduler output) as a step starts
OnStep = Callable[[object], None]  # (model runner) once the step's batch is laid out


@runtime_checkable
class EnginePlatform(Protocol):
    name: str
    VLLM_LINE: str  # the vLLM release line the class is written for, "0.32" or "0.23"
    # vLLM's scheduler (scheduler.py): its queues of waiting requests, and the attribute bounding running requests
    SCHEDULER_WAITING: tuple[str, ...]
    SCHEDULER_SEATS: str
    CLI_ARGS: str  # the module holding `vllm serve`'s argument parser and its checks (server.py)
    # True: the reroute is plain tensor code in the model's compiled graph (routing.reroute_traced), where the
    # compiler traces the MoE layer; False: the op expertweave::reroute_layer, whose device kernel (Triton,
    # Ascend C) the captured device graphs call
    REROUTE_TRACED: bool

    @staticmethod
    def finished_request_id(finished) -> str:
        """The request id of one item of what vLLM's Scheduler.finish_requests returns (pairing.py)."""

    # -- the front-end process, before an engine starts --------------------------------------------
    def engine_defaults(self, given: set[str]) -> dict:
        """Engine arguments (EngineArgs names) to add to those the user gave (`given`), which win."""

    def engine_environment(self) -> dict:
        """Environment the engine processes need unless the user set it."""

    # -- the worker ----------------------------------------------------------------------------------
    def patch_model_runner(self, on_load: OnLoad, on_schedule: OnSchedule, on_step: OnStep) -> None:
        """Installs the three hooks on this platform's model runner, once however often it is called."""

    def check_engine(self, runner, max_adapters: int) -> None:
        """Refuses, in one line and before anything is mapped, engine options that break the slot layout."""

    def loaded_model(self, runner) -> torch.nn.Module:
        """The model the runner loaded, out of any graph wrapper."""

    def iter_moe_layers(self, model: torch.nn.Module) -> Iterator[tuple[int, torch.nn.Module]]:
        """(decoder layer index, MoE layer) for every MoE layer; refuses layers this platform cannot serve."""

    def weave_device(self, runner) -> dict:
        """ExpertWeave's `backend` and `device` arguments (empty: host memory, CPU tables)."""

    def weave_installed(self, runner, weave) -> None:
        """KV-cache accounting once the base experts moved into virtual memory."""

    def expert_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        """The module that owns the layer's w13_weight / w2_weight."""

    def replace_expert_weight(self, layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
        """Makes the layer's expert weight `name` the (enlarged) virtual expert tensor."""

    def reroute_topk(self, layer: torch.nn.Module, reroute: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Makes every top-k selection of the layer pass its expert ids through reroute."""

    def pack_expert(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One expert ([2I, H] gate rows first, [H, I]) in the layout the engine gave the layer's experts."""

    def serve_shared_experts(self, layer: torch.nn.Module, hook: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
        """Makes the layer's shared-expert MLP call hook(output, input) on every forward, where this
        platform serves tuned shared experts (otherwise nothing)."""

    def pack_shared(self, layer: torch.nn.Module, w13: torch.Tensor, w2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A tuned shared-expert MLP ([2I', H] gate rows first, [H, I']) as this rank computes it; one
        clear ExpertWeaveError where the platform does not serve tuned shared experts."""

    def non_expert_variants_refusal(self, runner) -> str | None:
        """Why this engine cannot run each step with one adapter's non-expert weights, switched between steps
        (variants.py, grouping.py), naming the flags that would let it; None: it can, so adapters that tune
        non-expert modules are served."""

    def batch_layout(self, runner) -> tuple[list[str], np.ndarray]:
        """This step's requests in batch order and how many tokens each has in the flattened batch."""

    def moe_token_rows(self, token_adapter: torch.Tensor, num_selected: int) -> torch.Tensor:
        """The adapter row of each token a MoE layer selects experts for, from the step's per-token rows."""


def adapter_cache_salt(sha256: str, client_salt: str | None) -> str:
    """The cache_salt of a request for the adapter whose content hash is sha256; raises ValueError for a
    client salt that would forge an adapter's salt or not fit beside ours."""
    problem = client_salt_problem(client_salt)
    if problem is not None:
        raise ValueError(problem)
    return f"{client_salt or ''}{SALT_MARKER}{sha256[:SALT_HASH_CHARS]}"


def client_salt_problem(client_salt) -> str | None:
    if not isinstance(client_salt, str):
        return None  # absent, or vLLM's own validation refuses it
    if SALT_MARKER in client_salt:
        return f"cache_salt may not contain {SALT_MARKER!r}: the server keeps it for adapters' prefix-cache isolation"
    room = MAX_CACHE_SALT - len(SALT_MARKER) - SALT_HASH_CHARS
    if len(client_salt) > room:
        return f"cache_salt is {len(client_salt)} characters; with an ESFT adapter it may have at most {room}"
    return None


def request_adapter(sampling_params) -> str | None:
    """The adapter a request names (None: the base) in its SamplingParams (None for pooling requests)."""
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    return extra.get(ADAPTER_ARG)


def runs_expertweave_scheduler(vllm_config) -> bool:
    return vllm_config.scheduler_config.scheduler_cls == SCHEDULER


def scheduler_flags(vllm_config) -> list[str]:
    """The engine flags this engine would need to run ExpertWeave's scheduler synchronously, as contrastive
    decoding and non-expert adapters need (the CPU platforms' defaults; on vllm-ascend, flags to give)."""
    flags = [] if runs_expertweave_scheduler(vllm_config) else [f"--scheduler-cls {SCHEDULER}"]
    return flags + (["--no-async-scheduling"] if vllm_config.scheduler_config.async_scheduling else [])


def contrastive_refusal(vllm_config) -> str | None:
    """Why this engine cannot run contrastive requests (pairing.py), or None."""
    scheduler = vllm_config.scheduler_config
    flags = " ".join(scheduler_flags(vllm_config))
    if not runs_expertweave_scheduler(vllm_config):
        return (f"contrastive decoding needs ExpertWeave's scheduler, the default of vLLM CPU engines; this engine "
                f"runs {scheduler.scheduler_cls}: start it with {flags}")
    if scheduler.async_scheduling:
        return ("contrastive decoding needs synchronous scheduling; this engine schedules asynchronously: start it "
                f"with {flags}")
    if scheduler.max_num_seqs < 2:
        return "contrastive decoding runs each request beside a base-model twin: max_num_seqs must be 2 or more"
    tokens = (vllm_config.cache_config.num_gpu_blocks or 0) * vllm_config.cache_config.block_size
    longest = vllm_config.model_config.max_model_len
    if tokens < 2 * longest:
        return (f"contrastive decoding runs each request beside a base-model twin, and this engine's KV cache holds "
                f"{tokens} tokens, less than two sequences of max_model_len {longest}: raise the KV cache size or "
                "lower max_model_len")
    return None


def engine_config(geometry: BaseGeometry, adapters: dict[str, str], max_adapters: int,
                  adapter_slots: int | None = None, adapter_memory_bytes: int | None = None,
                  granularity: int | None = None, host_adapter_bytes: int = 0, warm: bool = False,
                  consolidate_rel_l2: float | None = None, shared_experts: bool = False) -> dict:
    """The engine's `additional_config["expertweave"]`; adapters are validated here, before any engine
    starts. Default slots: room for the given adapters, and a quarter of the experts per adapter row.
    host_adapter_bytes: the workers' host tier; warm: keep freed granules mapped for the next load (the
    workers size the budget: twice an adapter row's share of the slots); consolidate_rel_l2: serve adapter
    experts this near the base's (or a resident adapter's) by that expert (sharing.py; None: off);
    shared_experts: serve adapters that tune shared experts (on whenever a given adapter does). Off, the
    shared-expert MLP is left as vLLM compiles it, so the base and routed-only adapters match plain vLLM
    bit for bit; on, the per-token selection sits on its output and may round it differently."""
    check_rel_l2(consolidate_rel_l2)
    checked = {name: validate_adapter(path, geometry) for name, path in adapters.items()}
    if adapter_slots is None:
        adapter_slots = max(slots_needed((a.experts for a in checked.values()), geometry.moe_layers),
                            max_adapters * geometry.num_experts // 4)
    return {"adapters": {n: str(p) for n, p in adapters.items()}, "max_adapters": max_adapters,
            "adapter_slots": adapter_slots, "adapter_memory_bytes": adapter_memory_bytes,
            "granularity": granularity, "host_adapter_bytes": host_adapter_bytes, "warm": warm,
            "consolidate_rel_l2": consolidate_rel_l2,
            "shared_experts": shared_experts or any(a.shared_layers for a in checked.values())}


def expertweave_config(runner) -> dict | None:
    """The engine's `additional_config["expertweave"]` (None: ExpertWeave is off in this engine)."""
    return (runner.vllm_config.additional_config or {}).get("expertweave")


def shutdown_llm(llm) -> None:
    """Stops a vllm.LLM's engine processes now rather than at garbage collection."""
    llm.llm_engine.engine_core.shutdown()


def checked_moe_layers(api: EnginePlatform, model: torch.nn.Module, layer_cls: type
                       ) -> Iterator[tuple[int, torch.nn.Module]]:
    """(decoder layer index, MoE layer) for every decoder layer whose `mlp.experts` is a layer_cls, each
    refused or accepted by api.check_layer on the module that owns its expert weights."""
    for index, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if isinstance(experts, layer_cls):
            api.check_layer(index, api.expert_module(experts))
            yield index, experts


def refuse_data_parallelism(where: str, options: Mapping[str, object], environ: Mapping[str, str],
                            flags: bool = False) -> None:
    """Refuses, in one line and before any engine starts, engine options (EngineArgs names; flags: the user
    gave them as `vllm serve` flags) or environment that start more than one data-parallel engine. Refused
    until it can be tested: vLLM's DP clients send ExpertWeave's collective RPCs to every engine (internal
    load balancing; an external one: to the server's own engine only) and answer with the first engine's
    workers alone, while the MoE layers of all engines run each step together as one tensor-parallel group,
    and vLLM's CPU engine cannot run a MoE model data-parallel (its CPU communicator has no all_gatherv)."""
    asked = [f"--{name.replace('_', '-')} {options[name]}" if flags else f"{name}={options[name]}"
             for name in DATA_PARALLEL_SIZES if options.get(name) is not None and int(options[name]) > 1]
    if environ.get("VLLM_DP_SIZE", "").strip().isdigit() and int(environ["VLLM_DP_SIZE"]) > 1:
        asked.append(f"VLLM_DP_SIZE={environ['VLLM_DP_SIZE'].strip()}")
    if asked:
        raise ExpertWeaveError(f"{where}: data parallelism ({', '.join(asked)}) is not supported: every engine's "
                               "MoE layers would need the same adapters, but adapter loads, unloads and request "
                               "counts are answered by one engine; serve one engine per device behind a load "
                               "balancer, or one engine over several devices with --tensor-parallel-size")


def refuse_moe_parallelism(where: str, parallel) -> None:
    """Refuses, in one line, what vLLM's FusedMoEParallelConfig (0.32 and 0.23 alike) says ExpertWeave's vLLM
    CPU and CUDA platforms cannot serve."""
    if parallel.use_ep:
        raise ExpertWeaveError(f"{where}: expert parallelism (EP {parallel.ep_size}) is not supported: its dispatch "
                               "needs every adapter expert on the EP rank of its base expert; serve with TP")
    if parallel.dp_size > 1 or parallel.pcp_size > 1 or parallel.is_sequence_parallel:
        raise ExpertWeaveError(f"{where}: data, context or sequence parallelism is not supported: the MoE layer "
                               "routes tokens gathered from other ranks, whose adapters this rank does not know; "
                               "serve with TP, or one engine per device")


def shard_expert(w13: torch.Tensor, w2: torch.Tensor, tp_rank: int, tp_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert (w13 [2I, H], gate rows then up; w2 [H, I]) as TP rank tp_rank of tp_size holds it, as
    vLLM's FusedMoE weight loader splits it on both lines: its rows of gate then of up [2I/tp, H], its
    columns of down [H, I/tp]."""
    inter = w2.shape[1]
    if w13.shape[0] != 2 * inter or inter % tp_size:
        raise ExpertWeaveError(f"expert of shapes {tuple(w13.shape)} / {tuple(w2.shape)} cannot be split "
                               f"over {tp_size} tensor-parallel ranks")
    if tp_size == 1:
        return w13, w2
    size = inter // tp_size
    rows = slice(tp_rank * size, (tp_rank + 1) * size)
    return torch.cat([w13[:inter][rows], w13[inter:][rows]]), w2[:, rows]
