"""The worker side: the weave over the loaded model, the per-token adapter buffer, and the RPCs.

vLLM imports this module in each worker process, and only there, as it resolves the engine's
worker_extension_cls (ExpertWeaveWorkerExtension, which ExpertWeaveLLM and `expertweave serve` name),
after the general plugins (vllm-ascend's among them) have loaded and before the model runner loads the
model; importing it installs the model runner's hooks (install_hooks). So the API server never imports a
model runner (on Atlas: vllm-ascend's NPU runner), and an engine started without ExpertWeave is never hooked.

vLLM may compile the model with Dynamo, which runs Python hooks once at trace time. Where the compiler
traces the MoE layer (the CPU engine), the reroute is tensor code traced into the graph, which reads the
per-token buffer and the layer's table in place, so every step sees the current rows and adapters; on
CUDA and Ascend it is the custom op `expertweave::reroute_layer`, opaque to the compiler, whose body runs
on every forward, reads the current buffer and table of the engine running it, and calls the device kernel.

Nothing of an engine lives in this module: each engine's WorkerWeave hangs on its own model runner
(WEAVE_ATTR), the hooks act only for a runner carrying one, and the ops find it through the MoE layer
they run for (layer.py), so engines with and without ExpertWeave, or with other adapters, share a process.
"""

import logging
import math
from collections import Counter
from typing import Callable

import numpy as np
import torch

from ...errors import AdapterStateError, ExpertWeaveError
from ...geometry import BaseGeometry
from ...host_tier import HostTier
from ...loader import BackgroundLoader
from ...routing import reroute, reroute_traced
from ...weave import ExpertWeave, WeaveConfig
from . import platforms
from .contrastive import request_pair
from .engine import expertweave_config, request_adapter
from .layer import HANDLE_ATTR, VllmMoELayer
from .variants import VariantSwitcher
from .workers import Collected, ListedAdapter, StartAnswer, Tiers, UnloadStatus, wire

logger = logging.getLogger("expertweave")


class WorkerWeave:
    def __init__(self, model_runner, config: dict):
        self.api = platforms.current()
        self.model_runner = model_runner  # the one runner whose steps are this weave's
        weave_config = WeaveConfig(**{k: config[k] for k in ("max_adapters", "adapter_slots", "adapter_memory_bytes",
                                                             "granularity", "consolidate_rel_l2")
                                          if config.get(k) is not None})
        self.api.check_engine(model_runner, weave_config.max_adapters)
        if weave_config.consolidate_rel_l2 is not None and model_runner.parallel_config.tensor_parallel_size > 1:
            raise ExpertWeaveError("--consolidate-rel-l2 with tensor parallelism: each rank would measure the "
                                   "distance of its own shard of an expert and could decide differently; serve "
                                   "with one rank per engine, or without consolidation")
        self.layers = {index: VllmMoELayer(runner, index, self.api, self, bool(config.get("shared_experts")))
                       for index, runner in self.api.iter_moe_layers(self.api.loaded_model(model_runner))}
        if not self.layers:
            raise ExpertWeaveError(f"{model_runner.model_config.model}: no fused-MoE layers found")
        if config.get("warm"):
            weave_config.warm_bytes = 2 * warm_share(weave_config, self.layers.values())
        weave_config.non_expert_refusal = self.api.non_expert_variants_refusal(model_runner)
        geometry = BaseGeometry.from_checkpoint(model_runner.model_config.model)
        device_args = self.api.weave_device(model_runner)
        self.backend = device_args.get("backend")  # given to the weave, so closed here
        device = torch.device(device_args.get("device", "cpu"))
        # each token's adapter row, in the runner's token order; the layers' reroutes read it (install)
        self.token_adapter = torch.zeros(model_runner.max_num_tokens, dtype=torch.int32, device=device)
        self.weave = ExpertWeave(geometry, list(self.layers.values()), weave_config, **device_args)
        self.api.weave_installed(model_runner, self.weave)
        # Off the CPU the step's rows go through pinned host memory, so their copy does not block.
        self.staging = self.token_adapter if device.type == "cpu" else torch.zeros(
            model_runner.max_num_tokens, dtype=torch.int32, pin_memory=True)
        self.staging_np = self.staging.numpy()
        self.first_layer = min(self.layers)
        self.moe_rows: torch.Tensor | None = None  # this forward's rows as its MoE layers see the tokens
        self.filled = 0  # tokens the last step wrote; beyond them the buffer is already 0
        # (request ids, tokens per request) the buffer holds rows for; None after requests begin or end
        self.laid_out: tuple[list[str], bytes] | None = None
        # scheduled, not finished: request id -> (adapter, row, prompt length)
        self.requests: dict[str, tuple[str | None, int, int]] = {}
        # scheduled base twins of contrastive requests (pairing.py) -> their requests' ids; twins are not counted
        self.twins: dict[str, str] = {}
        self.paired: set[str] = set()  # scheduled contrastive requests (the twins' partners)
        self.started: Counter[str | None] = Counter()  # adapter -> requests begun (metrics.py)
        self.generated: Counter[str | None] = Counter()  # adapter -> tokens sampled
        self.switcher = VariantSwitcher(model_runner, model_runner.model_config.model) \
            if weave_config.non_expert_refusal is None else None
        self.host_tier = HostTier(config.get("host_adapter_bytes") or 0)
        self.loader = BackgroundLoader(self.weave, self.host_tier)
        for name, path in (config.get("adapters") or {}).items():
            self.weave.load_adapter(name, path)

    def reroute(self, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
        # Every MoE layer of a forward sees the same tokens: lay them out (on NPU with DP, an all-gather
        # every rank makes) at the forward's first MoE layer only.
        if layer == self.first_layer:
            self.moe_rows = self.api.moe_token_rows(self.token_adapter, topk_ids.shape[0])
        return reroute(topk_ids, self.moe_rows, self.layers[layer].table)

    def traced_reroute(self, table: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """A layer's reroute for a compiled graph to trace: this engine's per-token buffer and the layer's
        table, both updated in place between steps, never reallocated."""
        rows = self.token_adapter
        return lambda topk_ids: reroute_traced(topk_ids, rows, table)

    def shared_experts(self, out: torch.Tensor, x: torch.Tensor, layer: int) -> None:
        """Overwrites the shared-expert output of tokens whose adapter tunes this layer's shared experts."""
        shared = self.weave.shared_rows
        if shared.active(layer):
            rows = self.api.moe_token_rows(self.token_adapter, x.shape[0])
            shared.apply(layer, out, x, rows, self.layers[layer].shared_forward)

    def on_schedule(self, scheduler_output) -> None:
        """Request accounting from the scheduler's output: a request begins when first scheduled and ends
        when reported finished (aborted ones too: the abort has then landed)."""
        if scheduler_output.finished_req_ids or scheduler_output.scheduled_new_reqs:
            self.laid_out = None  # an id may come back as a new request with another adapter
        for req_id in scheduler_output.finished_req_ids:
            seen = self.requests.pop(req_id, None)
            if seen is not None:
                self.weave.end_request(seen[0])
            self.twins.pop(req_id, None)
            self.paired.discard(req_id)
        sampling = []
        for new in scheduler_output.scheduled_new_reqs:
            name = request_adapter(new.sampling_params)
            try:
                row = self.weave.begin_request(name)
            except AdapterStateError as e:
                # admission.py refuses these where vLLM admits requests; only an engine client without
                # an ExpertWeave front-end can send one, and serving it with the base would be wrong.
                raise ExpertWeaveError(f"request {new.req_id}: {e}; send requests through ExpertWeaveLLM or "
                                       "expertweave serve") from None
            self.requests[new.req_id] = (name, row, len(new.prompt_token_ids or ()))
            pair = request_pair(new.sampling_params)
            if pair is not None and pair[1] == "base":
                self.twins[new.req_id] = pair[0]
            else:
                self.started[name] += 1
                if pair is not None:
                    self.paired.add(new.req_id)
            if self._samples(new.req_id, new.num_computed_tokens, 0, scheduler_output):
                sampling.append(new.req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id, computed, outputs in zip(cached.req_ids, cached.num_computed_tokens, cached.num_output_tokens):
            if self._samples(req_id, computed, outputs, scheduler_output):
                sampling.append(req_id)
        self._count_sampled(sampling)
        if self.switcher is not None:
            self._switch_variant(scheduler_output)

    def _switch_variant(self, scheduler_output) -> None:
        """Makes the model's non-expert weights those of the step's requests (grouping.py gives a step the
        requests of one variant)."""
        variants = {}
        for req_id in scheduler_output.num_scheduled_tokens:
            seen = self.requests.get(req_id)
            loaded = self.weave.adapters.get(seen[0]) if seen is not None and seen[0] is not None else None
            key = (loaded.name, loaded.sha256) if loaded is not None and loaded.non_expert else None
            variants[key] = loaded.non_expert if key is not None else {}
        if len(variants) > 1:
            names = sorted("the base's" if key is None else key[0] for key in variants)
            raise ExpertWeaveError(f"a step mixes requests needing different non-expert weights ({', '.join(names)});"
                                   " the engine must run ExpertWeave's scheduler (grouping.py)")
        if variants:
            (key, weights), = variants.items()
            self.switcher.switch(key, weights)

    def _samples(self, req_id: str, computed: int, outputs: int, scheduler_output) -> bool:
        """Whether a request samples a token in this step: it computes its whole sequence so far."""
        seen = self.requests.get(req_id)
        return seen is not None and \
            computed + scheduler_output.num_scheduled_tokens.get(req_id, 0) >= seen[2] + outputs

    def _count_sampled(self, sampling: list[str]) -> None:
        """Counts the step's tokens per adapter: twins' are not counted, and a contrastive request's token
        counts only when its twin samples too (pairing.py drops it otherwise)."""
        paired = {self.twins[r] for r in sampling if r in self.twins}
        for req_id in sampling:
            if req_id in self.twins or (req_id in self.paired and req_id not in paired):
                continue
            self.generated[self.requests[req_id][0]] += 1

    def on_step(self, runner) -> None:
        req_ids, counts = self.api.batch_layout(runner)
        layout = (req_ids, counts.tobytes())
        if layout == self.laid_out:  # most decode steps: the buffer already holds these rows
            return
        self.laid_out = layout
        rows = np.fromiter((self.requests[r][1] for r in req_ids), dtype=np.int32, count=len(req_ids))
        total = int(counts.sum())
        end = max(total, self.filled)
        self.staging_np[:total] = np.repeat(rows, counts)
        self.staging_np[total:end] = 0  # padding tokens run as the base
        if self.staging is not self.token_adapter:
            self.token_adapter[:end].copy_(self.staging[:end], non_blocking=True)
        self.filled = total

    def unload_when_idle(self, name: str, live_request_ids) -> UnloadStatus:
        """Unloads the adapter if none of its requests runs and none of the engine client's live requests
        is still queued (not yet scheduled here, so perhaps this adapter's); else says how many."""
        loaded = self.weave.adapter(name)
        queued = sum(1 for r in live_request_ids if r not in self.requests)
        if loaded.in_flight or queued:
            return UnloadStatus(False, loaded.in_flight, queued)
        self.weave.unload_adapter(name, timeout=0)
        return UnloadStatus(True)

    def close(self) -> None:
        self.loader.close()
        self.weave.close()
        if self.backend is not None:
            self.backend.close()


def warm_share(config: WeaveConfig, layers) -> int:
    """One adapter row's share of the slots, in bytes over every layer: what an evicted adapter of
    average size frees, and so what the next load can reuse warm."""
    per_row = max(1, (config.adapter_slots or 0) // config.max_adapters)
    return per_row * sum(spec.dtype.itemsize * math.prod(spec.slot_shape)
                         for layer in layers for spec in layer.weight_specs())


WEAVE_ATTR = "_expertweave_weave"  # set on the model runner of an engine that runs ExpertWeave: its WorkerWeave


def _handle(layer_name: str) -> VllmMoELayer:
    """The woven MoE layer of that name in the engine whose forward is running (vLLM's forward context)."""
    from vllm.forward_context import get_forward_context

    return getattr(get_forward_context().no_compile_layers[layer_name], HANDLE_ATTR)


# Defined through Library for the same reason as expertweave::reroute: a cheap per-layer call.
_lib = torch.library.Library("expertweave", "FRAGMENT")
_lib.define("reroute_layer(Tensor topk_ids, str layer_name) -> Tensor")
_lib.impl("reroute_layer", lambda topk_ids, layer_name: _handle(layer_name).reroute(topk_ids),
          "CompositeExplicitAutograd")


@torch.library.register_fake("expertweave::reroute_layer")
def _(topk_ids: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(topk_ids)


# Opaque to the compiler as reroute_layer is: which tokens take an adapter's shared experts changes per step.
_lib.define("shared_experts_rows(Tensor(a!) out, Tensor x, str layer_name) -> ()")
_lib.impl("shared_experts_rows", lambda out, x, layer_name: _handle(layer_name).serve_shared(out, x),
          "CompositeExplicitAutograd")


@torch.library.register_fake("expertweave::shared_experts_rows")
def _(out: torch.Tensor, x: torch.Tensor, layer_name: str) -> None:
    return None


def runner_weave(runner) -> WorkerWeave | None:
    """The weave of this model runner's engine (None: the engine runs without ExpertWeave)."""
    return vars(runner).get(WEAVE_ATTR)


def on_load(runner) -> None:
    config = expertweave_config(runner)
    if config is not None:
        weave = WorkerWeave(runner, config)
        setattr(runner, WEAVE_ATTR, weave)
        logger.info("ExpertWeave: %d MoE layers, %d adapter slots per layer, adapters %s",
                    len(weave.layers), weave.weave.adapter_slots, sorted(weave.weave.adapters))


# The runner's methods are wrapped on its class: another engine in this process (a plain vLLM engine beside
# ExpertWeaveLLM, as verify runs them, or another ExpertWeaveLLM) steps through the same wrappers and reaches
# only its own runner's weave, if any.
def on_schedule(runner, scheduler_output) -> None:
    weave = runner_weave(runner)
    if weave is not None:
        weave.on_schedule(scheduler_output)


def on_step(runner) -> None:
    weave = runner_weave(runner)
    if weave is not None:
        weave.on_step(runner)


class ExpertWeaveWorkerExtension:
    """Methods vLLM appends to its worker (worker_extension_cls); called with collective_rpc."""

    def expertweave_load_adapter(self, name: str, path: str) -> dict:
        """This rank's LoadAnswer: its row and slots, or the one-line error it met; a rank that raised would
        leave the others loaded (agreement.py decides, and rolls back through expertweave_discard_adapter)."""
        return wire(weave_of(self).loader.load_now(name, path))

    def expertweave_start_load(self, name: str, path: str, evict: str | None = None,
                               live_request_ids: list[str] = ()) -> dict:
        """Starts loading in the background (loader.py); expertweave_collect_loads reports the outcome.
        With evict, first unloads that adapter if it is idle (as expertweave_unload_adapter) and starts
        nothing if it is not. A StartAnswer."""
        active = weave_of(self)
        if evict is not None:
            status = active.unload_when_idle(evict, live_request_ids)
            if not status.unloaded:
                return wire(StartAnswer(running=status.running, queued=status.queued))
        try:
            active.loader.start(name, path)
        except ExpertWeaveError as e:
            return wire(StartAnswer(evicted=evict is not None, error=str(e)))
        return wire(StartAnswer(started=True, evicted=evict is not None))

    def expertweave_collect_loads(self) -> dict:
        """A Collected: this rank's finished loads (published now), and the ones still loading."""
        loader = weave_of(self).loader
        return wire(Collected(loader.collect(), loader.loading()))

    def expertweave_prefetch(self, name: str, path: str) -> bool:
        """Packs an adapter into the host tier in the background; False if it is there or on its way."""
        return weave_of(self).loader.prefetch(name, path)

    def expertweave_warm_host_tier(self, entries: list[tuple[str, str]]) -> None:
        """Fills the host tier's free room with these (name, path) adapters, in order, in the background."""
        weave_of(self).loader.warm(entries)

    def expertweave_tiers(self) -> dict:
        """Tiers: which adapters this rank holds where, and the tiers' bytes."""
        active = weave_of(self)
        return wire(Tiers(sorted(active.weave.adapters), active.loader.loading(), active.host_tier.names(),
                          active.host_tier.resident_bytes, active.host_tier.budget_bytes,
                          active.weave.memory.warm_bytes))

    def expertweave_discard_adapter(self, name: str) -> None:
        """Takes back a load the ranks did not agree on (never published, so no request uses it)."""
        weave = weave_of(self).weave
        if name in weave.adapters:
            weave.unload_adapter(name, timeout=0)

    def expertweave_unload_adapter(self, name: str, live_request_ids: list[str]) -> dict:
        """An UnloadStatus: see WorkerWeave.unload_when_idle; the front-end polls it."""
        return wire(weave_of(self).unload_when_idle(name, live_request_ids))

    def expertweave_list_adapters(self) -> dict:
        """name -> ListedAdapter, for every adapter loaded on this rank."""
        return {name: wire(ListedAdapter(str(a.path), a.sha256, a.num_experts, a.nbytes, a.in_flight,
                                         bool(a.non_expert)))
                for name, a in weave_of(self).weave.adapters.items()}

    def expertweave_metrics(self) -> dict:
        """What /metrics shows (metrics.py), in one call: "served", requests begun and tokens sampled per
        adapter since the engine started ("" is the base) with the switches of non-expert weights between
        steps (variants.py) and the time they took; "memory", expertweave_memory_report(); "tiers",
        expertweave_tiers()."""
        active = weave_of(self)
        switcher = active.switcher
        served = {"requests": {name or "": n for name, n in active.started.items()},
                  "generated_tokens": {name or "": n for name, n in active.generated.items()},
                  "variant_switches": switcher.switches if switcher else 0,
                  "variant_switch_seconds": switcher.switch_s if switcher else 0.0}
        return {"served": served, "memory": self.expertweave_memory_report(), "tiers": self.expertweave_tiers()}

    def expertweave_close(self) -> None:
        """Unmaps and releases all expert memory; the engine must not run the model afterwards."""
        weave = vars(self.model_runner).pop(WEAVE_ATTR, None)
        if weave is not None:
            weave.close()

    def expertweave_memory_report(self) -> dict:
        """MemoryReport.to_json() of this rank."""
        model = weave_of(self).api.loaded_model(self.model_runner)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return weave_of(self).weave.memory_report(model_bytes=model_bytes).to_json()


def weave_of(worker) -> WorkerWeave:
    """The weave of this worker's engine (a vLLM worker, or the wrapper collective_rpc hands a function)."""
    weave = runner_weave(worker.model_runner)
    if weave is None:
        raise ExpertWeaveError("ExpertWeave is not enabled in this engine "
                               "(start it with additional_config={'expertweave': {...}})")
    return weave


def install_hooks() -> None:
    """The model runner's hooks on this process's platform (once however often it is called): they act
    only on the runner whose engine turned ExpertWeave on (on_load)."""
    platforms.current().patch_model_runner(on_load, on_schedule, on_step)


install_hooks()
