"""Tuned shared experts, served per token.

An adapter whose expert_cfg.json says `"shared_experts": true` replaces some MoE layers' shared-expert
MLP. In such a layer every token still runs the base's shared experts; then the tokens of that adapter's
table row run the adapter's MLP instead, and their output rows are overwritten, so one batch mixes the
base, routed-only adapters and shared-expert adapters. The weights live on the device as plain tensors
(they are as large as a few routed experts, per layer, and each adapter has its own).
"""

from typing import Callable

import torch

Weights = dict[str, torch.Tensor]  # one layer's shared-expert MLP in the engine's layout


class SharedExpertRows:
    """layer -> table row -> that row's adapter's shared-expert weights. Rows are added before they are
    published and removed after they are cleared and the device is idle (weave.py), so a step never sees
    a half-installed adapter; the maps are replaced, never changed in place, for readers mid-step."""

    def __init__(self):
        self.by_layer: dict[int, dict[int, Weights]] = {}

    def active(self, layer: int) -> bool:
        return layer in self.by_layer

    def add(self, row: int, weights: dict[int, Weights]) -> None:
        by_layer = {layer: dict(rows) for layer, rows in self.by_layer.items()}
        for layer, w in weights.items():
            by_layer.setdefault(layer, {})[row] = w
        self.by_layer = by_layer

    def remove(self, row: int) -> None:
        self.by_layer = {layer: rest for layer, rows in self.by_layer.items()
                         if (rest := {r: w for r, w in rows.items() if r != row})}

    def apply(self, layer: int, out: torch.Tensor, x: torch.Tensor, token_rows: torch.Tensor,
              forward: Callable[[Weights, torch.Tensor], torch.Tensor]) -> None:
        """Overwrites out[t] with forward(row's weights, x[t]) for every token t whose row has its own
        shared experts in this layer. out, x: [tokens, hidden]; token_rows: [tokens] table rows."""
        for row, weights in self.by_layer.get(layer, {}).items():
            tokens = (token_rows == row).nonzero().squeeze(1)
            if tokens.numel():
                out[tokens] = forward(weights, x[tokens]).to(out.dtype)
