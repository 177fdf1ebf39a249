"""Admitting a request's adapter where vLLM admits the request itself.

vLLM validates every request's SamplingParams inside its engine client's add_request, calling each
custom logits processor's validate_params, and registers the request as live in the same synchronous
stretch (vLLM 0.23: SamplingParams.verify; 0.32: InputProcessor's params validator). AdapterAdmission
is such a logits processor that changes no logits: its validate_params asks this process's front-end
(the server or ExpertWeaveLLM) whether the adapter a request names may start. So a request can never
slip between a front-end's own check and an unload: either it was refused, or it is already one of the
live requests the unload waits for (lifetime.py). The refusal is vLLM's own: a 400 over HTTP, a
ValueError offline.
"""

from typing import Callable

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from .contrastive import PROCESSOR as CONTRASTIVE_PROCESSOR
from .engine import request_adapter

ADMISSION = f"{__name__}:AdapterAdmission"  # what the engine's logits_processors gets (module:class)
PROCESSORS = (ADMISSION, CONTRASTIVE_PROCESSOR)

_gate: Callable[[str], str | None] | None = None  # adapter name -> why it may not start, or None


def set_gate(gate: Callable[[str], str | None] | None) -> None:
    """Installs this process's front-end check (None: admit every adapter, the workers then refuse)."""
    global _gate
    _gate = gate


class AdapterAdmission(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        name = request_adapter(sampling_params)
        problem = None if name is None or _gate is None else _gate(name)
        if problem is not None:
            raise ValueError(problem)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        pass

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def with_processors(processors: list | None) -> list:
    """The engine's logits_processors with ExpertWeave's (admission, contrastive decoding) added once."""
    processors = list(processors or [])
    return processors + [p for p in PROCESSORS if p not in processors]


def with_processors_args(vllm_args: list[str]) -> list[str]:
    """vllm serve arguments with ExpertWeave's processors among --logits-processors (the flag's last use
    wins)."""
    flag = "--logits-processors"
    args = list(vllm_args)
    for i in reversed(range(len(args))):
        if args[i] == flag:
            return args[: i + 1] + list(PROCESSORS) + args[i + 1:]
        if args[i].startswith(flag + "="):
            return args[:i] + [flag, args[i].partition("=")[2], *PROCESSORS] + args[i + 1:]
    return args + [flag, *PROCESSORS]
