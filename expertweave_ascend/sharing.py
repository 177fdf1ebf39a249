"""Which slot serves each expert an adapter tunes.

An adapter expert bit-identical to the base expert at its position is served by the base's own slot and
not loaded; one identical to an expert already resident at the same (layer, expert) shares that slot
(the slot is freed when its last owner unloads). Both are lossless. With consolidation on (rel_l2 = X),
an expert whose relative L2 distance ||a - b|| / ||b|| to the base expert b, or to a resident expert b at
its position, is at most X is served by the nearest such b: lossy, opt-in, and reported with its
distance. Every other expert gets a new slot.

A slot is indexed once its copy is issued (a load still running may share it): the sharer's publish
synchronizes the device before writing its row, so the copy is complete by then (I1).
"""

from dataclasses import dataclass, field

import torch

from .errors import ExpertWeaveError
from .memory import ExpertMemory
from .packed import PackedAdapter

PREFIX = 1024  # elements compared first: differing experts (nearly all) differ there already
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Placement:
    """Where each of a packed adapter's experts is served from, decided before its slots are taken."""
    slots: dict[int, list[int | None]]  # layer -> per expert of packed.experts[layer]: its slot (None: new)
    shared: dict[int, list[int]] = field(default_factory=dict)  # occupied adapter slots it joins
    base: int = 0  # experts served by the base's own expert
    distances: dict[str, float] = field(default_factory=dict)  # "layer.expert" -> rel L2, lossy ones only

    def new_counts(self) -> dict[int, int]:
        return {layer: n for layer, slots in self.slots.items() if (n := slots.count(None))}

    def fill(self, new: dict[int, list[int]]) -> dict[int, list[int]]:
        """Puts the allocated new slots in place; returns layer -> indices of the experts to copy in."""
        copy = {}
        for layer, taken in new.items():
            indices = [i for i, slot in enumerate(self.slots[layer]) if slot is None]
            for i, slot in zip(indices, taken):
                self.slots[layer][i] = slot
            copy[layer] = indices
        return copy


class ExpertIndex:
    """Published adapter slots by position and content: (layer, expert) -> {expert sha256: slot}."""

    def __init__(self):
        self.by_position: dict[tuple[int, int], dict[str, int]] = {}
        self.of_slot: dict[tuple[int, int], tuple[int, str]] = {}  # (layer, slot) -> (expert, sha256)

    def add(self, layer: int, expert: int, sha256: str, slot: int) -> None:
        """Indexes a slot; two loads prepared at once may each hold a copy of the same expert: the first
        indexed stays the one later loads share, the other is its owner's alone."""
        self.by_position.setdefault((layer, expert), {}).setdefault(sha256, slot)
        self.of_slot[layer, slot] = (expert, sha256)

    def drop(self, freed: dict[int, list[int]]) -> None:
        for layer, slots in freed.items():
            for slot in slots:
                entry = self.of_slot.pop((layer, slot), None)
                if entry is None:
                    continue
                at = self.by_position.get((layer, entry[0]), {})
                if at.get(entry[1]) == slot:
                    del at[entry[1]]
                if not at:
                    self.by_position.pop((layer, entry[0]), None)


def check_rel_l2(value: float | None, what: str = "consolidate_rel_l2") -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ExpertWeaveError(f"{what} {value!r}: expected a relative L2 distance, a number >= 0 "
                               "(0 serves only bit-identical experts by one copy, as with it off)")


def place(packed: PackedAdapter, memory: ExpertMemory, index: ExpertIndex, rel_l2: float | None,
          base_distances: dict[int, list[float | None]]) -> Placement:
    """Call with the weave's slot lock held: resident slots read here cannot be freed meanwhile.
    base_distances: base_distances(packed, ...) computed before, outside the lock."""
    placement = Placement({})
    for layer, ids in packed.experts.items():
        views = memory.views(layer)
        chosen: list[int | None] = []
        for i, expert in enumerate(ids):
            to_base = base_distances[layer][i]
            resident = index.by_position.get((layer, expert), {})
            slot = resident.get(packed.expert_sha256[layer][i])
            if to_base == 0.0:
                placement.base += 1
                chosen.append(expert)
            elif slot is not None:
                placement.shared.setdefault(layer, []).append(slot)
                chosen.append(slot)
            elif rel_l2 is not None:
                near = [(to_base, expert)] if to_base is not None and to_base <= rel_l2 else []
                if resident:
                    memory.backend.synchronize()  # copies another thread issued into them are complete
                for candidate in resident.values():
                    d = relative_l2(packed.weights[layer], i, views, candidate)
                    if d <= rel_l2:
                        near.append((d, candidate))
                if near:
                    d, slot = min(near)
                    placement.distances[f"{layer}.{expert}"] = d
                    if slot == expert:
                        placement.base += 1
                    else:
                        placement.shared.setdefault(layer, []).append(slot)
                    chosen.append(slot)
                else:
                    chosen.append(None)
            else:
                chosen.append(None)
        placement.slots[layer] = chosen
    return placement


def held_elsewhere(memory: ExpertMemory, index: ExpertIndex, layer: int, expert: int, sha256: str, slot: int) -> bool:
    """Whether the expert already written at slot is one place() serves without a slot of its own, losslessly:
    bit-identical to the base expert at its position, or the content of a resident slot at that position.
    Call with the weave's slot lock held."""
    views = memory.views(layer)
    return same_bytes(views, slot, views, expert) or sha256 in index.by_position.get((layer, expert), {})


def base_distances(packed: PackedAdapter, memory: ExpertMemory, rel_l2: float | None) -> dict[int, list[float | None]]:
    """Per expert: 0.0 when bit-identical to the base expert at its position; else its relative L2
    distance to it when consolidation is on (rel_l2 not None), else None. Base slots never change."""
    out = {}
    for layer, ids in packed.experts.items():
        views = memory.views(layer)
        out[layer] = [0.0 if same_bytes(packed.weights[layer], i, views, expert)
                      else relative_l2(packed.weights[layer], i, views, expert) if rel_l2 is not None else None
                      for i, expert in enumerate(ids)]
    return out


def same_bytes(weights: dict[str, torch.Tensor], i: int, views: dict[str, torch.Tensor], slot: int) -> bool:
    """Whether expert i of weights is bit for bit the expert in views at slot (-0.0 is not 0.0)."""
    pairs = [(_bits(values[i]), _bits(views[name][slot])) for name, values in weights.items()]
    if not all(torch.equal(a[:PREFIX], b[:PREFIX].to(a.device)) for a, b in pairs):
        return False
    return all(torch.equal(a, b.to(a.device)) for a, b in pairs)


def relative_l2(weights: dict[str, torch.Tensor], i: int, views: dict[str, torch.Tensor], slot: int) -> float:
    """||a - b|| / ||b|| over all weights of one expert, a = expert i of weights, b = views at slot."""
    diff = norm = 0.0
    for name, values in weights.items():
        a = values[i].float()
        b = views[name][slot].to(a.device).float()
        diff += float(torch.sum((a - b) ** 2, dtype=torch.float64))
        norm += float(torch.sum(b ** 2, dtype=torch.float64))
    return (diff / norm) ** 0.5 if norm else float("inf")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(_BITS[t.element_size()])
