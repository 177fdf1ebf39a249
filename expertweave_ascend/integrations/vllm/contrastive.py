"""Contrastive decoding in vLLM: the logits processor that picks one token for a request and its twin.

A contrastive request (extra_args CONTRASTIVE_ARG, set by the front-ends from the client's option) runs
with a twin: a hidden request for the base model on the same tokens, made by ExpertWeave's scheduler
(pairing.py), which marks both with PAIR_ARG = [pair id, role]. In a step where both rows of a pair are
in the batch, ContrastiveLogits scores the adapter row's logits against the base row's by the CoLD rule
(contrastive.py), picks the token, and leaves that token the only one either row can sample, so the pair
stays on the same sequence. A row whose partner is not in the batch is left alone: the scheduler drops
what such a row samples (pairing.py).
"""

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, process_dict_updates

from ...contrastive import Contrastive, cold_choose, cold_scores, parse_contrastive
from .engine import request_adapter

CONTRASTIVE_ARG = "esft_contrastive"  # extra_args: [alpha, beta] of an adapter's request (vllm_xargs' shape)
PAIR_ARG = "esft_pair"  # extra_args: [pair id, "adapter" | "base"], set by the scheduler
PROCESSOR = f"{__name__}:ContrastiveLogits"  # what the engine's logits_processors gets (module:class)


def variant_refusal(name: str) -> str:
    return (f"adapter {name!r} tunes non-expert modules, so its steps run without the base's weights: contrastive "
            "decoding serves adapters that tune experts (routed or shared) only")


def contrastive_arg(option: Contrastive) -> list[float]:
    return [option.alpha, option.beta]


def request_contrastive(sampling_params) -> Contrastive | None:
    """The request's option, or None; ValueError where the argument is malformed."""
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    value = extra.get(CONTRASTIVE_ARG)
    if value is None:
        return None
    where = f"extra_args[{CONTRASTIVE_ARG!r}]"
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{where}: expected [alpha, beta], got {value!r}")
    return parse_contrastive({"alpha": value[0], "beta": value[1]}, where)


def request_pair(sampling_params) -> tuple[str, str] | None:
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    pair = extra.get(PAIR_ARG)
    return (pair[0], pair[1]) if pair else None


def is_twin(sampling_params) -> bool:
    pair = request_pair(sampling_params)
    return pair is not None and pair[1] == "base"


class _Row:
    __slots__ = ("pair", "role", "alpha", "beta", "temperature", "generator")

    def __init__(self, params):
        self.pair, self.role = request_pair(params)
        option = request_contrastive(params) or Contrastive()
        self.alpha, self.beta = option.alpha, option.beta
        self.temperature = params.temperature
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None


class ContrastiveLogits(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        if request_contrastive(sampling_params) is not None and request_adapter(sampling_params) is None:
            raise ValueError("contrastive decoding contrasts an adapter with its base model: name an adapter")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, _Row] = {}  # batch index -> its pair, for the rows of pairs

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update,
                             lambda params, _prompt, _output: _Row(params) if request_pair(params) else None)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        members: dict[str, dict[str, int]] = {}
        for index, row in self.rows.items():
            members.setdefault(row.pair, {})[row.role] = index
        pairs = [(m["adapter"], m["base"]) for m in members.values() if len(m) == 2]
        if not pairs:
            return logits
        adapter_rows = torch.tensor([a for a, _ in pairs])
        base_rows = torch.tensor([b for _, b in pairs])
        rows = [self.rows[a] for a, _ in pairs]
        scores = cold_scores(logits[adapter_rows], logits[base_rows], torch.tensor([r.alpha for r in rows]),
                             torch.tensor([r.beta for r in rows]))
        chosen = cold_choose(scores, torch.tensor([r.temperature for r in rows]), [r.generator for r in rows])
        both = torch.cat([adapter_rows, base_rows])
        logits[both] = float("-inf")
        logits[both, torch.cat([chosen, chosen])] = 0.0
        return logits
