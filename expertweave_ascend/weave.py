"""ExpertWeave: binds adapters, virtual expert memory and routing tables to a model's MoE layers.

Engines hand over one MoELayerHandle per MoE layer (the only seam between this core and an engine)
and ask the weave to load and unload adapters. Invariants (DESIGN.md section 4):
I1 a table row is written only after every slot it points at is mapped and written, an adapter's
   name is published only after its row is written, and a row is cleared before its slots unmap;
I2 unload waits for an adapter's in-flight requests and admits no new ones meanwhile;
I3 memory follows occupancy granule by granule (ExpertMemory);
I6 an unloaded adapter's memory is unmapped only after the device finished every step queued before;
I5 a rejected adapter leaves tables, memory and requests untouched.
"""

import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import torch

from .adapters import check_adapter
from .adapters.esft import CFG_NAME
from .errors import AdapterError, AdapterStateError, CapacityError
from .geometry import BaseGeometry
from .memory import DEFAULT_GRANULARITY, ExpertMemory, HostBackend, MemoryBackend, WeightSpec
from .packed import CheckedReads, PackedAdapter
from .reports import AdapterMemory, MemoryReport
from .routing import RoutingTables
from .shared_experts import SharedExpertRows
from .sharing import ExpertIndex, Placement, base_distances, check_rel_l2, held_elsewhere, place


class MoELayerHandle(Protocol):
    layer: int  # decoder layer index, as ESFT numbers layers

    def weight_specs(self) -> list[WeightSpec]:
        """The per-expert weights of this layer in the engine's storage layout."""

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor, shared: SharedExpertRows) -> None:
        """Copies the base experts into views[name][:M], then makes the layer compute with the views
        (M + S slots) and reroute its top-k ids through table [rows, M] (updated in place); and, where
        the engine can, serve tuned shared experts per token through shared.apply."""

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """One expert's ESFT weights in the engine's storage layout, exactly as base experts are packed."""

    def pack_shared(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        """The layer's tuned shared-expert MLP in the layout its shared.apply forward takes; raises
        ExpertWeaveError naming the engine where it cannot serve tuned shared experts."""


def slots_needed(selections: Iterable[dict[int, Sequence[int]]], moe_layers: Iterable[int]) -> int:
    """Adapter slots per MoE layer that holding all these expert selections at once takes (at least 1)."""
    selections = list(selections)
    return max(1, max((sum(len(s.get(layer, ())) for s in selections) for layer in moe_layers), default=0))


@dataclass
class WeaveConfig:
    max_adapters: int = 8
    adapter_slots: int | None = None  # per MoE layer; default max_adapters * M / 4
    adapter_memory_bytes: int | None = None  # physical budget for adapter experts; None: unbounded
    granularity: int = DEFAULT_GRANULARITY
    warm_bytes: int = 0  # freed granules kept mapped for the next load (ExpertMemory); 0: unmapped at once
    consolidate_rel_l2: float | None = None  # serve near-duplicate experts by one copy (sharing.py); None: off
    # why this engine cannot run each step with one set of non-expert weights, switched between steps (None:
    # it can, so adapters that tune non-expert modules are served: integrations/vllm/variants.py)
    non_expert_refusal: str | None = ("such adapters need vLLM with ExpertWeave's scheduler (expertweave serve, "
                                      "ExpertWeaveLLM)")


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    row: int
    experts: dict[int, tuple[int, ...]]
    slots: dict[int, list[int]]  # layer -> the slot serving each of experts[layer] (< M: the base's own)
    nbytes: int  # engine-layout bytes of its experts
    sha256: str  # its identity: expert_cfg.json and the tensors as read and served (AdapterReader)
    base_experts: int = 0  # experts served by the base's own (identical, or consolidated) expert
    distances: dict[str, float] = field(default_factory=dict)  # "layer.expert" -> rel L2 of consolidated ones
    shared_bytes: int = 0  # its tuned shared experts, on the device (shared_experts.py)
    non_expert: dict[str, torch.Tensor] = field(default_factory=dict)  # its tuned non-expert tensors (host)
    in_flight: int = 0
    unloading: bool = False

    @property
    def non_expert_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.non_expert.values())

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())


@dataclass
class PendingLoad:
    """A load whose row and slots are taken and whose experts are copied in, not yet published."""
    name: str
    packed: PackedAdapter
    row: int
    placement: Placement
    shared: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # on the device


@dataclass
class ExpertWeave:
    base: BaseGeometry
    layers: list[MoELayerHandle]
    config: WeaveConfig = field(default_factory=WeaveConfig)
    backend: MemoryBackend | None = None
    device: torch.device | str = "cpu"

    def __post_init__(self):
        check_rel_l2(self.config.consolidate_rel_l2)
        self._owns_backend = self.backend is None
        if self._owns_backend:
            self.backend = HostBackend(self.config.granularity)
        m = self.base.num_experts
        slots = self.config.adapter_slots
        if slots is None:
            slots = max(1, self.config.max_adapters * m // 4)
        self.adapter_slots = slots
        self.handles = {h.layer: h for h in self.layers}
        self.memory = ExpertMemory(self.backend, {h.layer: h.weight_specs() for h in self.layers}, m, slots,
                                   self.config.adapter_memory_bytes, self.config.warm_bytes)
        self.tables = RoutingTables(list(self.handles), m, self.config.max_adapters, self.device)
        self.shared_rows = SharedExpertRows()
        for layer, handle in self.handles.items():
            handle.install(self.memory.views(layer), self.tables.layer(layer), self.shared_rows)
        self.adapters: dict[str, LoadedAdapter] = {}
        self._changing = threading.Lock()  # guards rows and slots while they are taken or given back
        self._pending: set[str] = set()  # names of loads prepared or being prepared, not yet published
        self._index = ExpertIndex()  # published adapter slots by content, for sharing (guarded by _changing)
        self._checked = CheckedReads()  # digests of adapter files read and checked, by the files' identities
        self._requests = threading.Condition()  # guards adapters' in_flight / unloading and self.adapters

    # -- adapters ---------------------------------------------------------------------------------
    # A load is pack (read, check and pack the files on the host), prepare (take a row and slots, copy
    # the packed experts in) and publish (write the row, then the name). Pack and the copy may run on
    # another thread while the engine steps: nothing reads the row or slots of a load not yet published.
    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        self.check_new_name(name)
        return self.publish(self.prepare_from_files(name, path))

    def packed_nbytes(self, path: str | Path) -> int:
        """Bytes pack(path) would hold for the adapter's experts, from its files' metadata (no tensor read):
        what a host tier would have to keep of an adapter that tunes experts only."""
        adapter = check_adapter(path, self.base)
        return sum(len(ids) * self.memory.expert_nbytes(layer) for layer, ids in adapter.experts.items())

    def prepare_from_files(self, name: str, path: str | Path) -> "PendingLoad":
        """prepare(name, pack(path)) without a packed copy on the host, for a load no host tier would keep: on a
        CPU device each tuned expert is read, checked and packed straight into a slot taken for it, which
        saves writing the adapter into fresh host memory first. Where that would not give prepare's
        placement (no room before sharing, an expert the base or a resident adapter holds, consolidation
        on) and for adapters that tune shared experts or non-expert modules, it is prepare(name, pack(path))."""
        self.check_new_name(name)
        adapter = check_adapter(path, self.base)
        direct = (torch.device(self.device).type == "cpu" and self.config.consolidate_rel_l2 is None
                  and not adapter.shared_layers and not adapter.non_expert_keys)
        pending = None
        if direct:
            with self._requests:
                self._pending.add(name)
            try:
                pending = self._prepare_in_slots(name, adapter)
            finally:
                if pending is None:
                    with self._requests:
                        self._pending.discard(name)
        return pending if pending is not None else self.prepare(name, self.pack(path))

    def _prepare_in_slots(self, name: str, adapter) -> "PendingLoad | None":
        """The new slots of every tuned expert, filled from the files; None (nothing kept) where the placement
        would differ from prepare's, or where files read with reused digests changed while read."""
        experts = {layer: ids for layer, ids in adapter.experts.items() if ids}
        with self._changing:
            row = self.tables.take_row(f"adapter {name}")
            try:
                new = self.memory.allocate(name, {layer: len(ids) for layer, ids in experts.items()})
            except BaseException as e:
                self.tables.give_back_row(row)
                if isinstance(e, CapacityError):  # sharing may make room: prepare decides, after reading
                    return None
                raise
        try:
            checked = self._checked.get(adapter.file_identities)
            expert_sha256 = {}
            with adapter.reading(checked) as read:
                for layer, ids in experts.items():
                    handle, views = self.handles[layer], self.memory.views(layer)
                    for expert, slot in zip(ids, new[layer]):
                        for weight, value in handle.pack_expert(*read(layer, expert)).items():
                            views[weight][slot].copy_(value)
                    expert_sha256[layer] = tuple(read.expert_sha256(layer, expert) for expert in ids)
                sha256, digests = read.sha256(), read.tensor_digests()
            packed = PackedAdapter(adapter.path.resolve(), experts, {}, expert_sha256, sha256, adapter.file_identities)
            stands = self._read_stands(packed, checked, digests)
            copies = [(layer, expert, digest, slot) for layer, ids in experts.items()
                      for expert, slot, digest in zip(ids, new[layer], expert_sha256[layer])]
            with self._changing:
                stands = stands and not any(held_elsewhere(self.memory, self._index, *copy) for copy in copies)
                if stands:
                    for copy in copies:
                        self._index.add(*copy)
        except BaseException:
            self._give_back(name, row)
            raise
        if not stands:
            self._give_back(name, row)
            return None
        return PendingLoad(name, packed, row, Placement({layer: list(slots) for layer, slots in new.items()}))

    def _read_stands(self, packed: PackedAdapter, checked: dict[str, bytes] | None, digests: dict[str, bytes]) -> bool:
        """Whether what was read is served: its files kept their identities through the read (their digests
        are remembered), or they changed but every byte was hashed and checked in it (served as hashed);
        bytes taken on trust from reused digests are read again, with every check."""
        if packed.unchanged():
            self._checked.put(packed.files, digests)
            return True
        self._checked.drop(packed.files)
        return checked is None

    def pack(self, path: str | Path) -> PackedAdapter:
        """Reads and checks the adapter's files and packs its experts on the host, in pinned memory when the
        weave's device is not the CPU: validate_adapter's checks, in its order, with the copies. Files read
        and checked before, unchanged since, are not hashed or checked again (CheckedReads)."""
        adapter = check_adapter(path, self.base)
        checked = self._checked.get(adapter.file_identities)
        packed, digests = self._pack(adapter, checked)
        return packed if self._read_stands(packed, checked, digests) else self.pack(path)

    def _pack(self, adapter, checked: dict[str, bytes] | None) -> tuple[PackedAdapter, dict[str, bytes]]:
        if adapter.non_expert_keys and self.config.non_expert_refusal is not None:
            raise AdapterError(adapter.path / CFG_NAME, '"non_expert_modules" is true: this engine runs every request '
                               f"with the base's non-expert weights; {self.config.non_expert_refusal}")
        pin = torch.device(self.device).type != "cpu"
        weights, expert_sha256 = {}, {}
        with adapter.reading(checked) as read:
            for layer, ids in adapter.experts.items():
                if not ids:
                    continue
                handle = self.handles[layer]
                packed = {spec.name: torch.empty((len(ids), *spec.slot_shape), dtype=spec.dtype, pin_memory=pin)
                          for spec in handle.weight_specs()}
                for i, expert in enumerate(ids):
                    for weight, value in handle.pack_expert(*read(layer, expert)).items():
                        packed[weight][i].copy_(value)
                weights[layer] = packed
                expert_sha256[layer] = tuple(read.expert_sha256(layer, expert) for expert in ids)
            shared = {layer: {name: _host_copy(t, pin) for name, t in
                              self.handles[layer].pack_shared(*read.shared(layer)).items()}
                      for layer in adapter.shared_layers}
            non_expert = read.non_expert()
            sha256 = read.sha256()
            digests = read.tensor_digests()
        return PackedAdapter(adapter.path.resolve(), {l: ids for l, ids in adapter.experts.items() if ids}, weights,
                             expert_sha256, sha256, adapter.file_identities, shared, non_expert), digests

    def prepare(self, name: str, packed: PackedAdapter) -> "PendingLoad":
        """Takes a row and slots for the adapter and copies its new experts in; publish() or abandon() it.
        Experts the base or a resident adapter already holds are not copied (sharing.py)."""
        self.check_new_name(name)
        with self._requests:
            self._pending.add(name)
        try:
            rel_l2 = self.config.consolidate_rel_l2
            to_base = base_distances(packed, self.memory, rel_l2)
            with self._changing:
                placement = place(packed, self.memory, self._index, rel_l2, to_base)
                row = self.tables.take_row(f"adapter {name}")
                try:
                    new = self.memory.allocate(name, placement.new_counts(), placement.shared)
                except BaseException:
                    self.tables.give_back_row(row)
                    raise
            pending = PendingLoad(name, packed, row, placement)
            try:
                copied = placement.fill(new)
                self._copy_experts(packed, copied, new)
                pending.shared = {layer: {w: t.to(self.device, non_blocking=True) for w, t in weights.items()}
                                  for layer, weights in packed.shared.items()}
            except BaseException:
                self._give_back(name, row)
                raise
            with self._changing:  # its copies are issued: later loads may share these slots (sharing.py)
                for layer, indices in copied.items():
                    for i, slot in zip(indices, new[layer]):
                        self._index.add(layer, packed.experts[layer][i], packed.expert_sha256[layer][i], slot)
        except BaseException:
            with self._requests:
                self._pending.discard(name)
            raise
        return pending

    def _copy_experts(self, packed: PackedAdapter, indices: dict[int, list[int]], slots: dict[int, list[int]]) -> None:
        """Copies packed expert indices[layer][j] into slots[layer][j]: one copy per run where both are
        consecutive (allocate() hands out the lowest free slots, in order)."""
        for layer, layer_slots in slots.items():
            views = self.memory.views(layer)
            picks = indices[layer]
            start = 0
            for end in range(1, len(layer_slots) + 1):
                if (end == len(layer_slots) or layer_slots[end] != layer_slots[end - 1] + 1
                        or picks[end] != picks[end - 1] + 1):
                    first, count = layer_slots[start], end - start
                    for weight, values in packed.weights[layer].items():
                        views[weight][first:first + count].copy_(values[picks[start]:picks[start] + count])
                    start = end

    def publish(self, pending: "PendingLoad") -> LoadedAdapter:
        """Writes the adapter's row once its experts are on the device (I1), then makes its name known. The
        device-wide synchronize also completes the copies of loads whose slots this one shares."""
        packed, placement = pending.packed, pending.placement
        self.backend.synchronize()
        self.tables.write_row(pending.row, {layer: dict(zip(packed.experts[layer], placement.slots[layer]))
                                            for layer in placement.slots})
        if pending.shared:
            self.shared_rows.add(pending.row, pending.shared)
        nbytes = sum(len(ids) * self.memory.expert_nbytes(layer) for layer, ids in packed.experts.items())
        loaded = LoadedAdapter(pending.name, packed.path, pending.row, dict(packed.experts), placement.slots, nbytes,
                               packed.sha256, placement.base, placement.distances, packed.shared_nbytes,
                               packed.non_expert)
        with self._requests:
            self._pending.discard(pending.name)
            self.adapters[pending.name] = loaded
        return loaded

    def abandon(self, pending: "PendingLoad") -> None:
        """Gives back the row and slots of a load that will not be published."""
        self._give_back(pending.name, pending.row)
        with self._requests:
            self._pending.discard(pending.name)

    def _give_back(self, name: str, row: int) -> None:
        with self._changing:
            self.tables.give_back_row(row)
            self._index.drop(self.memory.release(name))

    def check_new_name(self, name: str) -> None:
        with self._requests:
            if name in self.adapters:
                raise AdapterStateError(f"adapter {name!r} is already loaded (from {self.adapters[name].path})")
            if name in self._pending:
                raise AdapterStateError(f"adapter {name!r} is already being loaded")

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Waits up to timeout seconds (None: forever) for the adapter's requests to finish."""
        with self._requests:
            loaded = self.adapter(name)
            if loaded.unloading:
                raise AdapterStateError(f"adapter {name!r} is already being unloaded")
            loaded.unloading = True
            if not self._requests.wait_for(lambda: loaded.in_flight == 0, timeout):
                loaded.unloading = False
                raise AdapterStateError(f"adapter {name!r} still has {loaded.in_flight} request(s) in flight "
                                        f"after {timeout} s; not unloaded")
            del self.adapters[name]
        self.tables.clear_row(loaded.row)
        # I6: a step queued before the row was cleared may still read the slots (vLLM schedules
        # asynchronously); unmap only once the device has finished it.
        self.backend.synchronize()
        self.shared_rows.remove(loaded.row)
        with self._changing:
            try:
                self._index.drop(self.memory.release(name))
            finally:
                self.tables.give_back_row(loaded.row)

    def adapter(self, name: str) -> LoadedAdapter:
        """The loaded adapter of this name; AdapterStateError naming the loaded ones if there is none."""
        if name not in self.adapters:
            known = ", ".join(sorted(self.adapters)) or "none"
            raise AdapterStateError(f"unknown adapter {name!r} (loaded: {known})")
        return self.adapters[name]

    # -- requests ---------------------------------------------------------------------------------
    def begin_request(self, name: str | None) -> int:
        """Table row for a request of this adapter (None: the base, row 0); pair with end_request."""
        if name is None:
            return 0
        with self._requests:
            loaded = self.adapter(name)
            if loaded.unloading:
                raise AdapterStateError(f"adapter {name!r} is being unloaded")
            loaded.in_flight += 1
            return loaded.row

    def end_request(self, name: str | None) -> None:
        if name is None:
            return
        with self._requests:
            self.adapters[name].in_flight -= 1
            self._requests.notify_all()

    # -- accounting -------------------------------------------------------------------------------
    def memory_report(self, model_bytes: int | None = None) -> MemoryReport:
        """Byte accounting; model_bytes (all base weights) lets it price one merged copy per adapter."""
        with self._requests:
            adapters = list(self.adapters.values())
        # Slots counted over published adapters only: a load still being prepared holds slots no report shows.
        owners = Counter((layer, slot) for a in adapters for layer, slots in a.slots.items() for slot in slots
                         if slot >= self.base.num_experts)
        slot_bytes = sum(self.memory.expert_nbytes(layer) for layer, _ in owners)
        with self._changing:
            return MemoryReport.of(self.memory, {a.name: self._adapter_memory(a, owners) for a in adapters},
                                   self.adapter_slots, model_bytes, slot_bytes)

    def _adapter_memory(self, a: LoadedAdapter, owners: Counter) -> AdapterMemory:
        shared = charged = 0.0
        for layer, slots in a.slots.items():
            for slot in slots:
                if slot >= self.base.num_experts:
                    shared += owners[layer, slot] > 1
                    charged += self.memory.expert_nbytes(layer) / owners[layer, slot]
        return AdapterMemory({layer: len(ids) for layer, ids in a.experts.items()}, a.nbytes, row=a.row,
                             sha256=a.sha256, base_experts=a.base_experts, shared_slots=int(shared),
                             shared_expert_bytes=a.shared_bytes, non_expert_bytes=a.non_expert_bytes,
                             saved_bytes=round(a.nbytes - charged), consolidated=dict(a.distances) or None)

    def close(self) -> None:
        self.memory.close()
        if self._owns_backend:
            self.backend.close()


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin).copy_(tensor)
