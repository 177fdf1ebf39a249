"""Adapters that tune non-expert modules ("non_expert_modules": true): partial runtime reconfiguration.

Such an adapter replaces tensors every token reads (attention, norms, the dense layers, embeddings, the
head), so its requests cannot share a step with anyone else's. ExpertWeave's scheduler (grouping.py)
gives each step the requests of one variant: an adapter of this kind, or the base's non-expert weights,
which the base and every adapter that tunes experts only share. Before a step runs, the worker makes the
model's non-expert weights that step's variant's through vLLM's in-place layerwise reload, which writes
the checkpoint-format tensors through each layer's weight loader and re-runs the touched layers' post-load
processing (the CPU GEMM packing of linear layers, MLA's absorbed matrices): a copy, not a remap, because
vLLM's CPU layers compute from packed copies of their weights, not from the checkpoint tensors' pages.
"""

import logging
import time
from contextlib import contextmanager

import torch

from ...adapters.checkpoint import Checkpoint

VARIANT_ARG = "esft_variant"  # extra_args key: the adapter whose non-expert weights a request needs
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # warns per layer a switch leaves alone
# Checkpoint tensors vLLM loads into one parameter (DeepseekV2Model.load_weights' stacked_params_mapping): a
# layerwise reload given one of them rebuilds the parameter from empty memory, so a switch loads them all.
FUSED = (("gate_proj", "up_proj"), ("q_a_proj", "kv_a_proj_with_mqa"))


def request_variant(sampling_params) -> str | None:
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    return extra.get(VARIANT_ARG)


class VariantSwitcher:
    """The model's non-expert weights: the base's, or one adapter's (applied = the names last loaded)."""

    def __init__(self, runner, base_path: str):
        self.runner = runner
        self.base = Checkpoint.open(base_path)
        self.base_values: dict[str, torch.Tensor] = {}  # base tensors a variant replaced, read once
        self.current: tuple[str, str] | None = None  # (adapter, sha256) whose weights are in, None: the base's
        self.applied: set[str] = set()
        self.switches = 0
        self.switch_s = 0.0  # time spent switching, all switches

    def switch(self, variant: tuple[str, str] | None, weights: dict[str, torch.Tensor]) -> None:
        """Makes the model's non-expert weights the base's with `weights` (a variant's tensors) over them."""
        if variant == self.current:
            return
        start = time.perf_counter()
        names = fused_siblings(set(weights), self.base.tensors)
        load = {**self._base((names - set(weights)) | (self.applied - names)), **weights}
        if load:
            self._reload(load)
        self.current, self.applied = variant, names
        self.switches += 1
        self.switch_s += time.perf_counter() - start

    def _base(self, names: set[str]) -> dict[str, torch.Tensor]:
        missing = sorted(names - set(self.base_values))
        if missing:
            with self.base.reading() as read:
                for name in missing:
                    self.base_values[name] = read(name)
        return {name: self.base_values[name] for name in names}

    def _reload(self, weights: dict[str, torch.Tensor]) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = self.runner.get_model()
        with _quiet(RELOAD_LOGGER):
            initialize_layerwise_reload(model)
            model.load_weights(iter(weights.items()))
            finalize_layerwise_reload(model, self.runner.model_config)


def fused_siblings(names: set[str], available) -> set[str]:
    """names, with every checkpoint tensor loaded into the same vLLM parameter as one of them."""
    out = set(names)
    for name in names:
        parts = name.rsplit(".", 2)
        if len(parts) != 3:
            continue
        prefix, module, kind = parts
        for group in FUSED:
            if module in group:
                out |= {sibling for m in group if (sibling := f"{prefix}.{m}.{kind}") in available}
    return out


@contextmanager
def _quiet(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
