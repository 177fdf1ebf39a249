"""The rerouting tables Pi: one int32 tensor [moe_layers, rows, M]; row 0 is the base (identity)."""

import torch

from ..errors import CapacityError


class RoutingTables:
    def __init__(self, moe_layers: list[int], num_experts: int, max_adapters: int,
                 device: torch.device | str = "cpu"):
        self.layer_index = {layer: i for i, layer in enumerate(moe_layers)}
        self.num_experts = num_experts
        identity = torch.arange(num_experts, dtype=torch.int32, device=device)
        self.tensor = identity.repeat(len(moe_layers), max_adapters + 1, 1).contiguous()
        self._identity = identity
        self.free_rows = list(range(1, max_adapters + 1))

    def layer(self, layer: int) -> torch.Tensor:
        """[rows, M] view for one MoE layer; updated in place, so engines may hold on to it."""
        return self.tensor[self.layer_index[layer]]

    def take_row(self, what: str) -> int:
        if not self.free_rows:
            raise CapacityError(f"{what}: all {self.tensor.shape[1] - 1} adapter rows are in use")
        return self.free_rows.pop(0)

    def write_row(self, row: int, slots: dict[int, dict[int, int]]) -> None:
        """slots[layer][expert] = slot holding the adapter's copy; other experts stay identity."""
        for layer, mapping in slots.items():
            # Built on the host and copied once: item writes into a device tensor are a launch each.
            values = torch.arange(self.num_experts, dtype=torch.int32)
            for expert, slot in mapping.items():
                values[expert] = slot
            self.layer(layer)[row].copy_(values)

    def clear_row(self, row: int) -> None:
        self.tensor[:, row].copy_(self._identity.expand(self.tensor.shape[0], -1))

    def give_back_row(self, row: int) -> None:
        assert row not in self.free_rows and 0 < row < self.tensor.shape[1], f"row {row} is not in use"
        self.clear_row(row)
        self.free_rows.append(row)
        self.free_rows.sort()
