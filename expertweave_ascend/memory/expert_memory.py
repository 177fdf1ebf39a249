"""All MoE layers' virtual expert tensors, their slot allocators and the physical pool behind them."""

from dataclasses import dataclass

import torch

from .backend import MemoryBackend
from .pool import PhysicalPool
from .slots import SlotAllocator
from .virtual_tensor import VirtualExpertTensor


@dataclass(frozen=True)
class WeightSpec:
    """One per-expert weight of a layer as the engine stores it, e.g. w13 [2I, H] or w2 [H, I]."""
    name: str
    slot_shape: tuple[int, ...]
    dtype: torch.dtype


class ExpertMemory:
    def __init__(self, backend: MemoryBackend, layers: dict[int, list[WeightSpec]], num_base: int,
                 num_adapter_slots: int, adapter_budget_bytes: int | None = None, warm_bytes: int = 0):
        self.backend = backend
        self.num_base = num_base
        self.pool = PhysicalPool(backend, warm_budget_bytes=warm_bytes)
        self.tensors: dict[int, dict[str, VirtualExpertTensor]] = {}
        self.slots: dict[int, SlotAllocator] = {}
        try:
            for layer, specs in layers.items():
                self.slots[layer] = SlotAllocator(num_base, num_adapter_slots)
                self.tensors[layer] = {}
                for spec in specs:
                    vt = VirtualExpertTensor(backend, self.pool, num_base + num_adapter_slots,
                                             spec.slot_shape, spec.dtype)
                    self.tensors[layer][spec.name] = vt
                    vt.map_fixed(num_base)
        except BaseException:
            self.close()
            raise
        self.base_mapped_bytes = self.mapped_bytes
        self.base_allocations = self.pool.allocations  # physical allocations (and map calls) for the base
        if adapter_budget_bytes is not None:
            self.pool.budget_bytes = self.base_mapped_bytes + adapter_budget_bytes

    def views(self, layer: int) -> dict[str, torch.Tensor]:
        return {name: vt.tensor for name, vt in self.tensors[layer].items()}

    def expert_nbytes(self, layer: int) -> int:
        return sum(vt.slot_nbytes for vt in self.tensors[layer].values())

    @property
    def mapped_bytes(self) -> int:
        return sum(vt.mapped_bytes for layer in self.tensors.values() for vt in layer.values())

    @property
    def warm_bytes(self) -> int:
        """Mapped granules no slot occupies (kept warm for the next load, up to the pool's warm budget)."""
        return self.pool.warm_bytes

    @property
    def base_expert_bytes(self) -> int:
        return sum(self.num_base * self.expert_nbytes(layer) for layer in self.tensors)

    def allocate(self, owner: str, counts: dict[int, int],
                 shared: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
        """Takes and maps counts[layer] new slots per layer for owner, and makes owner a sharer of the
        occupied slots shared[layer] (nothing mapped for those); all or nothing. Returns the new slots."""
        for layer, slots in (shared or {}).items():
            for slot in slots:
                if not self.slots[layer].sharers(slot):
                    raise ValueError(f"{owner}: layer {layer} slot {slot} is free, it cannot be shared")
        chosen = {layer: self.slots[layer].choose(n, f"layer {layer}") for layer, n in counts.items() if n}
        extra = sum(vt.new_granules(slots) for layer, slots in chosen.items()
                    for vt in self.tensors[layer].values()) * self.backend.granularity
        if self.pool.available_bytes is not None and extra > self.pool.available_bytes:
            self._cool(extra - self.pool.available_bytes)
        self.pool.check(extra, f"adapter {owner}")
        done: list[int] = []
        try:
            for layer, slots in chosen.items():
                mapped: list[VirtualExpertTensor] = []
                try:
                    for vt in self.tensors[layer].values():
                        vt.map_slots(slots)
                        mapped.append(vt)
                except BaseException:
                    for vt in mapped:
                        vt.unmap_slots(slots)
                    raise
                self.slots[layer].take(owner, slots)
                done.append(layer)
        except BaseException:
            for layer in done:
                self.slots[layer].give_back(chosen[layer])
                for vt in self.tensors[layer].values():
                    vt.unmap_slots(chosen[layer])
            raise
        for layer, slots in (shared or {}).items():
            self.slots[layer].share(owner, slots)
        return chosen

    def release(self, owner: str) -> dict[int, list[int]]:
        """Drops owner from its slots and unmaps the ones no other owner holds; returns those per layer."""
        freed = {}
        for layer, alloc in self.slots.items():
            slots = alloc.release(owner)
            for vt in self.tensors[layer].values():
                vt.unmap_slots(slots)
            if slots:
                freed[layer] = slots
        return freed

    def occupied_slot_bytes(self) -> int:
        """Bytes of the occupied adapter slots, each counted once however many owners share it."""
        return sum((alloc.num_slots - alloc.num_base - alloc.free_count) * self.expert_nbytes(layer)
                   for layer, alloc in self.slots.items())

    def _cool(self, nbytes: int) -> None:
        """Gives back warm granules (nbytes, or all there are) so a load fits the physical budget."""
        for layer in self.tensors.values():
            for vt in layer.values():
                nbytes -= vt.cool(nbytes)
                if nbytes <= 0:
                    return

    def slots_of(self, owner: str) -> dict[int, list[int]]:
        return {layer: s for layer, alloc in self.slots.items() if (s := alloc.slots_of(owner))}

    def close(self) -> None:
        for layer in self.tensors.values():
            for vt in layer.values():
                vt.close()
        self.tensors.clear()
