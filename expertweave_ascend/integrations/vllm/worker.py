"""The worker side: the weave over the loaded model, the per-token adapter buffer, and the RPCs.

vLLM may compile the model with Dynamo, which runs Python hooks once at trace time. Rerouting is
therefore the custom op `expertweave::reroute_layer`, opaque to the compiler, whose body runs on
every forward and reads this process's current buffer and table.
"""

import logging

import numpy as np
import torch

from ...errors import ExpertWeaveError
from ...geometry import BaseGeometry
from ...weave import ExpertWeave, WeaveConfig
from . import compat
from .layer import VllmMoELayer

logger = logging.getLogger("expertweave")


class WorkerWeave:
    def __init__(self, model_runner, config: dict):
        self.api = compat.engine_api()
        self.layers = {index: VllmMoELayer(runner, index, self.api)
                       for index, runner in self.api.iter_moe_layers(self.api.loaded_model(model_runner))}
        if not self.layers:
            raise ExpertWeaveError(f"{model_runner.model_config.model}: no fused-MoE layers found")
        geometry = BaseGeometry.from_checkpoint(model_runner.model_config.model)
        weave_config = WeaveConfig(**{k: config[k] for k in ("max_adapters", "adapter_slots", "adapter_memory_bytes",
                                                             "granularity") if config.get(k) is not None})
        device_args = self.api.weave_device(model_runner)
        self.backend = device_args.get("backend")  # given to the weave, so closed here
        self.weave = ExpertWeave(geometry, list(self.layers.values()), weave_config, **device_args)
        self.api.weave_installed(model_runner, self.weave)
        device = torch.device(self.weave.device)
        self.token_adapter = torch.zeros(model_runner.max_num_tokens, dtype=torch.int32, device=device)
        # Off the CPU the step's rows go through pinned host memory, so their copy does not block.
        self.staging = self.token_adapter if device.type == "cpu" else torch.zeros(
            model_runner.max_num_tokens, dtype=torch.int32, pin_memory=True)
        self.staging_np = self.staging.numpy()
        self.first_layer = min(self.layers)
        self.moe_rows: torch.Tensor | None = None  # this forward's rows as its MoE layers see the tokens
        self.filled = 0  # tokens the last step wrote; beyond them the buffer is already 0
        self.request_adapter: dict[str, str | None] = {}
        for name, path in (config.get("adapters") or {}).items():
            self.weave.load_adapter(name, path)

    def reroute(self, topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
        # Every MoE layer of a forward sees the same tokens: lay them out (on NPU with DP, an all-gather
        # every rank makes) at the forward's first MoE layer only.
        if layer == self.first_layer:
            self.moe_rows = self.api.moe_token_rows(self.token_adapter, topk_ids.shape[0])
        return torch.ops.expertweave.reroute(topk_ids, self.moe_rows, self.layers[layer].table)

    def on_step(self, runner) -> None:
        req_ids, counts = self.api.batch_layout(runner)
        rows = np.fromiter((self._row(runner, r) for r in req_ids), dtype=np.int32, count=len(req_ids))
        total = int(counts.sum())
        end = max(total, self.filled)
        self.staging_np[:total] = np.repeat(rows, counts)
        self.staging_np[total:end] = 0  # padding tokens run as the base
        if self.staging is not self.token_adapter:
            self.token_adapter[:end].copy_(self.staging[:end], non_blocking=True)
        self.filled = total

    def _row(self, runner, req_id: str) -> int:
        # The front end (ExpertWeaveLLM, the server) admits requests only for loaded adapters and
        # unloads only once an adapter's requests are done (I2); the runner hears of finished
        # requests a step late, so it cannot count them itself.
        if req_id not in self.request_adapter:
            self.request_adapter[req_id] = self.api.request_adapter(runner, req_id)
        name = self.request_adapter[req_id]
        if name is None:
            return 0
        loaded = self.weave.adapters.get(name)
        if loaded is None:
            logger.error("request %s names adapter %r, which is not loaded; served by the base model", req_id, name)
            self.request_adapter[req_id] = None
            return 0
        return loaded.row

    def on_request_removed(self, req_id: str) -> None:
        self.request_adapter.pop(req_id, None)

    def close(self) -> None:
        self.weave.close()
        if self.backend is not None:
            self.backend.close()


_ACTIVE: WorkerWeave | None = None


# Defined through Library for the same reason as expertweave::reroute: a cheap per-layer call.
_lib = torch.library.Library("expertweave", "FRAGMENT")
_lib.define("reroute_layer(Tensor topk_ids, int layer) -> Tensor")
_lib.impl("reroute_layer", lambda topk_ids, layer: _ACTIVE.reroute(topk_ids, layer), "CompositeExplicitAutograd")


@torch.library.register_fake("expertweave::reroute_layer")
def _(topk_ids: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(topk_ids)


def on_load(runner) -> None:
    global _ACTIVE
    config = compat.expertweave_config(runner)
    if config is not None:
        _ACTIVE = WorkerWeave(runner, config)
        logger.info("ExpertWeave: %d MoE layers, %d adapter slots per layer, adapters %s",
                    len(_ACTIVE.layers), _ACTIVE.weave.adapter_slots, sorted(_ACTIVE.weave.adapters))


def on_step(runner) -> None:
    if _ACTIVE is not None:
        _ACTIVE.on_step(runner)


def on_request_removed(runner, req_id: str) -> None:
    if _ACTIVE is not None:
        _ACTIVE.on_request_removed(req_id)


class ExpertWeaveWorkerExtension:
    """Methods vLLM appends to its worker (worker_extension_cls); called with collective_rpc."""

    def expertweave_load_adapter(self, name: str, path: str) -> dict:
        loaded = _active().weave.load_adapter(name, path)
        return {"row": loaded.row, "experts": loaded.num_experts, "bytes": loaded.nbytes}

    def expertweave_unload_adapter(self, name: str, timeout: float | None = 0.0) -> None:
        _active().weave.unload_adapter(name, timeout)

    def expertweave_list_adapters(self) -> dict:
        return {name: {"path": str(a.path), "experts": a.num_experts, "bytes": a.nbytes}
                for name, a in _active().weave.adapters.items()}

    def expertweave_close(self) -> None:
        """Unmaps and releases all expert memory; the engine must not run the model afterwards."""
        global _ACTIVE
        if _ACTIVE is not None:
            _ACTIVE.close()
            _ACTIVE = None

    def expertweave_memory_report(self) -> dict:
        model = _active().api.loaded_model(self.model_runner)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return _active().weave.memory_report(model_bytes=model_bytes)


def _active() -> WorkerWeave:
    if _ACTIVE is None:
        raise ExpertWeaveError("ExpertWeave is not enabled in this engine "
                               "(start it with additional_config={'expertweave': {...}})")
    return _ACTIVE
