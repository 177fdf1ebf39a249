"""Contrastive decoding between an adapter and its base model (CoLD, arXiv 2505.14620).

At each step, with s_a the adapter model's log-probabilities and s_b the base model's for the same
sequence, the candidates are the tokens the adapter finds plausible, V = {i : s_a[i] >= log(alpha) +
max s_a}, and among them the score (1 + beta) s_a - beta s_b prefers what the adapter favours more than
the base does. Greedy decoding takes the best score; with a temperature it samples softmax(score / T).
beta = 0 is plain adapter decoding. The engines (integrations/) only decide where the two rows of logits
come from; the rule is here, once.
"""

import math
from dataclasses import dataclass

import torch

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily, as vLLM's sampler does
MAX_BETA = 100.0  # the score grows with beta; past this the base's log-probabilities alone decide


@dataclass(frozen=True)
class Contrastive:
    alpha: float = 0.1  # plausibility: keep tokens with p_a >= alpha * max p_a
    beta: float = 0.5  # strength of the contrast with the base

    def to_json(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta}


def parse_contrastive(value, where: str = "contrastive") -> Contrastive:
    """The option as a client gives it ({"alpha": a, "beta": b}, either may be left out); ValueError
    naming `where` and the field for anything else."""
    if isinstance(value, Contrastive):
        value = value.to_json()
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object {{\"alpha\": number in (0, 1], \"beta\": number >= 0}}, "
                         f"got {type(value).__name__}")
    unknown = sorted(set(value) - {"alpha", "beta"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (expected alpha, beta)")
    fields = {**Contrastive().to_json(), **value}
    for name, number in fields.items():
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not _finite(number):
            shown = repr(number) if len(repr(number)) <= 40 else repr(number)[:40] + "..."
            raise ValueError(f"{where}.{name}: expected a finite number, got {shown}")
    if not 0 < fields["alpha"] <= 1:
        raise ValueError(f"{where}.alpha: {fields['alpha']!r} is outside (0, 1]")
    if not 0 <= fields["beta"] <= MAX_BETA:
        raise ValueError(f"{where}.beta: {fields['beta']!r} is outside [0, {MAX_BETA:g}]")
    return Contrastive(float(fields["alpha"]), float(fields["beta"]))


def _finite(number: int | float) -> bool:
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def cold_scores(adapter_logits: torch.Tensor, base_logits: torch.Tensor, alpha: torch.Tensor,
                beta: torch.Tensor) -> torch.Tensor:
    """Scores [N, V] of N sequences (alpha, beta: [N]); -inf outside each row's candidates."""
    s_a = torch.log_softmax(adapter_logits.float(), dim=-1)
    s_b = torch.log_softmax(base_logits.float(), dim=-1)
    plausible = s_a >= torch.log(alpha.to(s_a.device))[:, None] + s_a.max(dim=-1, keepdim=True).values
    beta = beta.to(s_a.device)[:, None]
    scores = (1 + beta) * s_a - beta * s_b
    return scores.masked_fill(~plausible, float("-inf"))


def cold_choose(scores: torch.Tensor, temperature: torch.Tensor,
                generators: list[torch.Generator | None] | None = None) -> torch.Tensor:
    """The token of each row of cold_scores: the best score, or a sample of softmax(score / temperature)."""
    chosen = scores.argmax(dim=-1)
    for i in torch.nonzero(temperature >= GREEDY_BELOW).flatten().tolist():
        probs = torch.softmax(scores[i] / float(temperature[i]), dim=-1)
        generator = generators[i] if generators is not None else None
        if generator is not None:
            probs = probs.to(generator.device)
        chosen[i] = torch.multinomial(probs, 1, generator=generator)[0].to(chosen.device)
    return chosen
