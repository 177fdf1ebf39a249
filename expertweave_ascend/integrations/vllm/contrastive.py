"""Contrastive decoding in vLLM: the logits processor that picks one token for a request and its twin.

A contrastive request (extra_args CONTRASTIVE_ARGS, set by the front-ends from the client's option) runs
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

# extra_args: alpha and beta of an adapter's request, two numbers (vLLM 0.23's completions take only scalars in
# vllm_xargs)
CONTRASTIVE_ARGS = ("esft_contrastive_alpha", "esft_contrastive_beta")
PAIR_ARG = "esft_pair"  # extra_args: [pair id, "adapter" | "base"], set by the scheduler
PROCESSOR = f"{__name__}:ContrastiveLogits"  # what the engine's logits_processors gets (module:class)


def variant_refusal(name: str) -> str:
    return (f"adapter {name!r} tunes non-expert modules, so its steps run without the base's weights: contrastive "
            "decoding serves adapters that tune experts (routed or shared) only")


def contrastive_args(option: Contrastive) -> dict[str, float]:
    return dict(zip(CONTRASTIVE_ARGS, (option.alpha, option.beta)))


def request_contrastive(sampling_params) -> Contrastive | None:
    """The request's option, or None; ValueError where the arguments are malformed."""
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    values = [extra.get(arg) for arg in CONTRASTIVE_ARGS]
    if values == [None, None]:
        return None
    where = f"extra_args[{CONTRASTIVE_ARGS[0]!r}, {CONTRASTIVE_ARGS[1]!r}]"
    if None in values:
        raise ValueError(f"{where}: expected both, got {values!r}")
    return parse_contrastive(dict(zip(("alpha", "beta"), values)), where)


PROMPT_LOGPROBS_REFUSAL = "contrastive decoding does not return prompt_logprobs: leave them out"
STRUCTURED_REFUSAL = "contrastive decoding does not take structured outputs (guided decoding)"
PARALLEL_REFUSAL = "contrastive decoding samples one sequence per request beside its base twin: n and best_of must be 1"
PROMPT_EMBEDS_REFUSAL = ("contrastive decoding runs the base model on the same prompt: give token ids or text, not "
                         "prompt_embeds")


def params_problem(sampling_params) -> str | None:
    """Why these sampling parameters cannot go with contrastive decoding, or None. (Prompt logprobs come back
    in the step a prompt ends, which a pair may have to compute again; a grammar would hold one member.)"""
    if sampling_params is None:
        return None
    if sampling_params.prompt_logprobs is not None:
        return PROMPT_LOGPROBS_REFUSAL
    if sampling_params.structured_outputs is not None:
        return STRUCTURED_REFUSAL
    if sampling_params.n > 1:
        return PARALLEL_REFUSAL
    return None


def request_pair(sampling_params) -> tuple[str, str] | None:
    extra = (sampling_params.extra_args if sampling_params is not None else None) or {}
    pair = extra.get(PAIR_ARG)
    return (pair[0], pair[1]) if pair else None


class _Row:
    __slots__ = ("pair", "role", "alpha", "beta", "temperature", "seed", "output")

    def __init__(self, params, output: list[int]):
        self.pair, self.role = request_pair(params)
        option = request_contrastive(params) or Contrastive()
        self.alpha, self.beta = option.alpha, option.beta
        self.temperature = params.temperature
        self.seed = params.seed
        self.output = output  # the runner's list of the request's output tokens, kept up to date in place

    def generator(self) -> torch.Generator | None:
        """A seeded request's draw for its next token depends on the seed and the tokens kept so far only, not
        on how often the request left the batch or had a sample dropped (pairing.py)."""
        if self.seed is None:
            return None
        return torch.Generator().manual_seed((self.seed * 1_000_003 + len(self.output)) % (1 << 63))


class ContrastiveLogits(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.device = device
        self.rows: dict[int, _Row] = {}  # batch index -> its pair, for the rows of pairs
        self.pairs: _Pairs | None = None  # the complete pairs among rows; built again when the batch changes

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if process_dict_updates(self.rows, batch_update,
                                lambda params, _prompt, output: _Row(params, output) if request_pair(params) else None):
            self.pairs = None

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        if self.pairs is None:
            self.pairs = _Pairs(self.rows, self.device)
        pairs = self.pairs
        if not pairs.rows:
            return logits
        scores = cold_scores(logits[pairs.adapter_rows], logits[pairs.base_rows], pairs.alpha, pairs.beta)
        chosen = cold_choose(scores, pairs.temperature, [r.generator() for r in pairs.rows])
        logits[pairs.both] = float("-inf")
        logits[pairs.both, torch.cat([chosen, chosen])] = 0.0
        return logits


class _Pairs:
    """The batch rows of the pairs with both members in the batch, and their options, as tensors."""

    def __init__(self, rows: dict[int, _Row], device: torch.device):
        members: dict[str, dict[str, int]] = {}
        for index, row in rows.items():
            members.setdefault(row.pair, {})[row.role] = index
        pairs = [(m["adapter"], m["base"]) for m in members.values() if len(m) == 2]
        self.rows = [rows[a] for a, _ in pairs]
        self.adapter_rows = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=device)
        self.base_rows = torch.tensor([b for _, b in pairs], dtype=torch.long, device=device)
        self.both = torch.cat([self.adapter_rows, self.base_rows])
        self.alpha = torch.tensor([r.alpha for r in self.rows], device=device)
        self.beta = torch.tensor([r.beta for r in self.rows], device=device)
        self.temperature = torch.tensor([r.temperature for r in self.rows])
