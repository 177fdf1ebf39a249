"""The memory and verify reports: one dataclass each, built in one place, rendered as text or as JSON.

A MemoryReport is built by MemoryReport.of from the ExpertMemory the adapters were allocated in, by the
weave (what is loaded) and by the memory plan (what would be); `--json` prints to_json(), and reports
that cross a process boundary (vLLM's collective_rpc, HTTP) travel as that JSON and come back through
from_json.
"""

from dataclasses import asdict, dataclass, fields

from .memory import ExpertMemory

GB = 1e9


@dataclass(frozen=True)
class AdapterMemory:
    experts_per_layer: dict[int, int]  # MoE layer -> experts the adapter tunes there
    bytes: int  # its experts in the engine's layout
    row: int | None = None  # its routing-table row, once loaded
    added_mapped_bytes: int | None = None  # granules its allocation mapped (the memory plan records it)
    sha256: str | None = None  # its content identity, once loaded
    base_experts: int = 0  # tuned experts served by the base's own expert (identical, or consolidated)
    shared_slots: int = 0  # tuned experts in a slot other loaded adapters hold too
    saved_bytes: int = 0  # bytes its experts would take alone, less its share of the slots it holds
    consolidated: dict[str, float] | None = None  # "layer.expert" -> relative L2 distance, lossy ones only
    shared_expert_bytes: int = 0  # its tuned shared experts (device tensors, not in the expert slots)
    non_expert_bytes: int = 0  # its tuned non-expert tensors (host; switched in for its steps)

    @classmethod
    def of(cls, memory: ExpertMemory, experts_per_layer: dict[int, int], **kwargs) -> "AdapterMemory":
        counts = {layer: n for layer, n in experts_per_layer.items() if n}
        return cls(counts, sum(n * memory.expert_nbytes(layer) for layer, n in counts.items()), **kwargs)

    @property
    def experts(self) -> int:
        return sum(self.experts_per_layer.values())

    @property
    def max_per_layer(self) -> int:
        return max(self.experts_per_layer.values(), default=0)


@dataclass(frozen=True)
class MemoryReport:
    granularity: int
    moe_layers: int
    adapter_slots_per_layer: int
    base_expert_bytes: int
    base_mapped_bytes: int
    base_allocations: int  # physical allocations (and map calls) holding the base experts
    adapter_expert_bytes: int
    adapter_mapped_bytes: int
    padded_bytes: int  # what padding every adapter to its largest layer (E_max) would take
    merged_bytes: int | None  # one merged model per adapter; None: the model's size was not given
    budget_bytes: int | None
    adapters: dict[str, AdapterMemory]
    warm_bytes: int = 0  # mapped granules no slot occupies, kept for the next load (not in adapter_mapped_bytes)
    adapter_slot_bytes: int | None = None  # occupied adapter slots, each once however many adapters share it

    @classmethod
    def of(cls, memory: ExpertMemory, adapters: dict[str, AdapterMemory], adapter_slots: int,
           model_bytes: int | None = None, slot_bytes: int | None = None) -> "MemoryReport":
        """slot_bytes: the adapters' occupied slots, each once (default: every occupied slot)."""
        all_layers_bytes = sum(memory.expert_nbytes(layer) for layer in memory.tensors)
        return cls(
            granularity=memory.backend.granularity,
            moe_layers=len(memory.tensors),
            adapter_slots_per_layer=adapter_slots,
            base_expert_bytes=memory.base_expert_bytes,
            base_mapped_bytes=memory.base_mapped_bytes,
            base_allocations=memory.base_allocations,
            adapter_expert_bytes=sum(a.bytes for a in adapters.values()),
            adapter_mapped_bytes=memory.mapped_bytes - memory.base_mapped_bytes - memory.warm_bytes,
            padded_bytes=sum(a.max_per_layer for a in adapters.values()) * all_layers_bytes,
            merged_bytes=None if model_bytes is None else model_bytes * len(adapters),
            budget_bytes=memory.pool.budget_bytes,
            adapters=adapters,
            warm_bytes=memory.warm_bytes,
            adapter_slot_bytes=memory.occupied_slot_bytes() if slot_bytes is None else slot_bytes,
        )

    @property
    def shared_expert_bytes(self) -> int:
        """Tuned shared experts of every adapter (device tensors beside the expert slots)."""
        return sum(a.shared_expert_bytes for a in self.adapters.values())

    @property
    def slot_bytes(self) -> int:
        return self.adapter_expert_bytes if self.adapter_slot_bytes is None else self.adapter_slot_bytes

    @property
    def saved_bytes(self) -> int:
        """Adapter expert bytes not held in memory: served by the base or by a slot another adapter holds."""
        return self.adapter_expert_bytes - self.slot_bytes

    @property
    def fragmentation(self) -> float | None:
        """Mapped adapter bytes over their slots' bytes (1.0: no granule holds anything else)."""
        return self.adapter_mapped_bytes / self.slot_bytes if self.slot_bytes else None

    @property
    def padded_fragmentation(self) -> float | None:
        return self.padded_bytes / self.adapter_expert_bytes if self.adapter_expert_bytes else None

    def to_json(self) -> dict:
        data = asdict(self)
        data["fragmentation"] = self.fragmentation
        data["padded_fragmentation"] = self.padded_fragmentation
        data["saved_bytes"] = self.saved_bytes
        data["shared_expert_bytes"] = self.shared_expert_bytes
        for name, adapter in self.adapters.items():
            data["adapters"][name].update(experts=adapter.experts, max_per_layer=adapter.max_per_layer)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "MemoryReport":
        adapter_fields = {f.name for f in fields(AdapterMemory)}
        adapters = {}
        for name, adapter in data["adapters"].items():
            values = {k: v for k, v in adapter.items() if k in adapter_fields}
            values["experts_per_layer"] = {int(layer): n for layer, n in values["experts_per_layer"].items()}
            adapters[name] = AdapterMemory(**values)
        report_fields = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in data.items() if k in report_fields}, "adapters": adapters})


@dataclass(frozen=True)
class VerifyRow:
    prompt: str
    output: str
    tokens_equal: bool
    max_abs_diff: float  # of the compared values, over the tokens both runs share
    differs_from_base: bool | None = None  # the merged model's own tokens differ from the base's (hf)
    agreement: float | None = None  # greedy token agreement with the merged model over the prompt set (hf)
    mean_kl: float | None = None  # mean KL(merged || served) per token over the prompt set (hf)


@dataclass(frozen=True)
class VerifyReport:
    engine: str  # "hf" or "vllm"
    compared: str  # what max_abs_diff compares: "logits" (hf) or "logprobs" (vllm)
    device: str
    base_model: str
    dtype: str
    max_new_tokens: int
    base: VerifyRow
    adapters: dict[str, VerifyRow]
    memory: MemoryReport
    consolidate_rel_l2: float | None = None  # near-duplicate experts were served by one copy (lossy)
    prompts: int | None = None  # prompts of the divergence figures (hf)

    @property
    def ok(self) -> bool:
        return self.base.tokens_equal and all(row.tokens_equal for row in self.adapters.values())

    @property
    def consolidated_only(self) -> bool:
        """Every output that differs from its merged model is an adapter's with consolidated experts."""
        return self.base.tokens_equal and all(row.tokens_equal or self.memory.adapters[name].consolidated
                                              for name, row in self.adapters.items())

    def to_json(self) -> dict:
        return {**asdict(self), "memory": self.memory.to_json(), "ok": self.ok}


def format_verify(report: VerifyReport) -> str:
    lines = [f"ExpertWeave verify ({report.engine}, {report.device}, {report.dtype}, {report.max_new_tokens} greedy "
             f"tokens)",
             f"{'model':<14}{'experts':>8}{'bytes':>12}  {'equal':<6}{f'max|d {report.compared}|':>18}"
             f"{'agree':>7}{'mean KL':>10}  output"]
    m = report.memory
    for name, row in [("base", report.base), *report.adapters.items()]:
        adapter = m.adapters.get(name) if name in report.adapters else None
        experts, nbytes = (adapter.experts, adapter.bytes) if adapter else ("-", "-")
        agree = "-" if row.agreement is None else f"{row.agreement:.3f}"
        kl = "-" if row.mean_kl is None else f"{row.mean_kl:.2e}"
        lines.append(f"{name:<14}{experts:>8}{nbytes:>12}  {'yes' if row.tokens_equal else 'NO':<6}"
                     f"{row.max_abs_diff:>18.2e}{agree:>7}{kl:>10}  {row.output[:40]!r}")
    frag = "n/a" if m.fragmentation is None else f"{m.fragmentation:.3f}"
    lines += [
        f"memory: base experts {_mib(m.base_expert_bytes)} (mapped {_mib(m.base_mapped_bytes)}), "
        f"adapter experts {_mib(m.adapter_expert_bytes)}, in slots {_mib(m.slot_bytes)}, mapped "
        f"{_mib(m.adapter_mapped_bytes)} (fragmentation {frag}, granule {_mib(m.granularity)})",
        f"        padded to E_max {_mib(m.padded_bytes)}, merged copies "
        f"{_mib(m.merged_bytes) if m.merged_bytes is not None else 'n/a'}",
        *format_sharing(m),
    ]
    if report.prompts:
        lines.append(f"agree / mean KL: greedy next-token agreement and KL(merged || served) per token, on the "
                     f"merged model's own continuations of {report.prompts} prompts")
    if report.consolidate_rel_l2 is not None:
        lines.append(f"consolidation on (relative L2 <= {report.consolidate_rel_l2:g}): outputs may differ from "
                     "the merged models by the divergence shown")
    lines.append("all outputs equal the merged models" if report.ok else "MISMATCH: some outputs differ")
    return "\n".join(lines)


def format_sharing(m: MemoryReport) -> list[str]:
    """One line per adapter that does not hold all its experts alone; none when no adapter shares."""
    lines = []
    for name, a in m.adapters.items():
        if a.base_experts or a.shared_slots or a.consolidated:
            worst = f", largest distance {max(a.consolidated.values()):.2e}" if a.consolidated else ""
            lines.append(f"  {name}: {a.base_experts} experts served by the base's, {a.shared_slots} in slots "
                         f"shared with other adapters, {len(a.consolidated or ())} consolidated{worst}; "
                         f"saves {_mib(a.saved_bytes)}")
    if lines:
        lines.insert(0, f"experts held once: {_mib(m.saved_bytes)} of adapter experts not held twice")
    return lines


def format_plan(plan: MemoryReport) -> str:
    lines = [f"{'adapter':<12}{'experts':>8}{'max/layer':>10}{'expert GB':>11}{'+mapped GB':>12}"]
    for name, a in plan.adapters.items():
        lines.append(f"{name:<12}{a.experts:>8}{a.max_per_layer:>10}{a.bytes / GB:>11.3f}"
                     f"{a.added_mapped_bytes / GB:>12.3f}")
    lines += [
        f"base experts {plan.base_expert_bytes / GB:.3f} GB over {plan.moe_layers} MoE layers "
        f"(mapped {plan.base_mapped_bytes / GB:.3f} GB, granule {plan.granularity / 2**20:g} MiB, "
        f"{plan.base_allocations} physical allocations and map calls for "
        f"{plan.base_mapped_bytes // plan.granularity} granules)",
        f"adapters: experts {plan.adapter_expert_bytes / GB:.3f} GB, mapped {plan.adapter_mapped_bytes / GB:.3f} GB"
        f" -> fragmentation {plan.fragmentation:.4f}",
        f"padded to E_max: {plan.padded_bytes / GB:.3f} GB (fragmentation {plan.padded_fragmentation:.3f})",
    ]
    if plan.merged_bytes is not None:
        lines.append(f"merged copies: {plan.merged_bytes / GB:.3f} GB")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
