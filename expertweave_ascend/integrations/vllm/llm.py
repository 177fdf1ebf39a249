"""ExpertWeaveLLM: vllm.LLM serving a base model and many ESFT adapters in one engine."""

import os
import threading
from pathlib import Path
from typing import Sequence

from ...adapters import check_adapter, validate_adapter
from ...catalogue import AdapterCatalogue
from ...contrastive import Contrastive, parse_contrastive
from ...errors import AdapterStateError, CapacityError, ExpertWeaveError
from ...geometry import BaseGeometry
from ...reports import MemoryReport
from ...residency import UNLOADING, Residency
from ...sharing import check_rel_l2
from ...weave import slots_needed
from . import admission, agreement, lifetime, platforms
from .contrastive import (CONTRASTIVE_ARGS, PAIR_ARG, PROMPT_EMBEDS_REFUSAL, contrastive_args, params_problem,
                          variant_refusal)
from .engine import (ADAPTER_ARG, adapter_cache_salt, client_salt_problem, contrastive_refusal,
                     refuse_data_parallelism, shutdown_llm)
from .variants import VARIANT_ARG

WORKER_EXTENSION = "expertweave_ascend.integrations.vllm.worker.ExpertWeaveWorkerExtension"


def engine_config(geometry: BaseGeometry, adapters: dict[str, str], max_adapters: int,
                  adapter_slots: int | None = None, adapter_memory_bytes: int | None = None,
                  granularity: int | None = None, host_adapter_bytes: int = 0, warm: bool = False,
                  consolidate_rel_l2: float | None = None, shared_experts: bool = False) -> dict:
    """The engine's `additional_config["expertweave"]`; adapters are validated here, before any engine
    starts. Default slots: room for the given adapters, and a quarter of the experts per adapter row.
    host_adapter_bytes: the workers' host tier; warm: keep freed granules mapped for the next load (the
    workers size the budget: twice an adapter row's share of the slots); consolidate_rel_l2: serve adapter
    experts this near the base's (or a resident adapter's) by that expert (sharing.py; None: off);
    shared_experts: serve adapters that tune shared experts (on whenever a given adapter does). Off, the
    shared-expert MLP is left as vLLM compiles it, so the base and routed-only adapters match plain vLLM
    bit for bit; on, the per-token selection sits on its output and may round it differently."""
    check_rel_l2(consolidate_rel_l2)
    checked = {name: validate_adapter(path, geometry) for name, path in adapters.items()}
    if adapter_slots is None:
        adapter_slots = max(slots_needed((a.experts for a in checked.values()), geometry.moe_layers),
                            max_adapters * geometry.num_experts // 4)
    return {"adapters": {n: str(p) for n, p in adapters.items()}, "max_adapters": max_adapters,
            "adapter_slots": adapter_slots, "adapter_memory_bytes": adapter_memory_bytes,
            "granularity": granularity, "host_adapter_bytes": host_adapter_bytes, "warm": warm,
            "consolidate_rel_l2": consolidate_rel_l2,
            "shared_experts": shared_experts or any(a.shared_layers for a in checked.values())}


class ExpertWeaveLLM:
    """A vllm.LLM whose requests each name an adapter (or None for the base model).

    Adapters are served by name from a catalogue: `adapters` (NAME -> path; the first max_adapters are
    loaded at start) and every subdirectory of `adapter_root`. generate loads the adapters its prompts
    name, evicting idle ones by `eviction_policy` (residency.py); prompts naming more adapters than fit
    at once run in waves, each wave's adapters loaded before it runs. Adapters loaded by hand
    (load_adapter) stay until unloaded by hand.

    Adapters are checked here before anything reaches the engine. Unload admits no new requests of the
    adapter and waits until the engine's workers report none of them running or queued (lifetime.py);
    from another thread while generate runs, that needs vLLM's engine in its own process (the default).
    """

    def __init__(self, model: str, adapters: dict[str, str] | None = None, *, max_adapters: int = 8,
                 adapter_slots: int | None = None, adapter_memory_bytes: int | None = None,
                 granularity: int | None = None, adapter_root: str | Path | None = None,
                 host_adapter_bytes: int = 0, eviction_policy: str = "lru",
                 consolidate_rel_l2: float | None = None, shared_experts: bool = False, **llm_kwargs):
        refuse_data_parallelism("ExpertWeaveLLM", llm_kwargs, os.environ)
        from vllm import LLM

        self.model = model
        self.geometry = BaseGeometry.from_checkpoint(model)
        adapters = dict(adapters or {})
        for path in list(adapters.values())[max_adapters:]:  # the first ones are checked by engine_config
            shared_experts |= bool(check_adapter(path, self.geometry).shared_layers)
        self.catalogue = AdapterCatalogue(adapter_root, adapters)
        self.residency = Residency(max_adapters, eviction_policy)
        preload = dict(list(adapters.items())[:max_adapters])
        additional = dict(llm_kwargs.pop("additional_config", None) or {})
        additional["expertweave"] = engine_config(
            self.geometry, preload, max_adapters, adapter_slots, adapter_memory_bytes, granularity,
            host_adapter_bytes, warm=adapter_root is not None or len(adapters) > max_adapters,
            consolidate_rel_l2=consolidate_rel_l2, shared_experts=shared_experts)
        for key, value in platforms.current().engine_defaults(set(llm_kwargs)).items():
            llm_kwargs.setdefault(key, value)
        llm_kwargs["logits_processors"] = admission.with_processors(llm_kwargs.get("logits_processors"))
        for key, value in platforms.current().engine_environment().items():
            os.environ.setdefault(key, value)  # read by the engine processes this one starts
        self.llm = LLM(model=model, additional_config=additional, worker_extension_cls=WORKER_EXTENSION,
                       **llm_kwargs)
        # the residency's entries: name -> content hash and kind, of the adapters requests may name
        for name, listed in self._rpc("expertweave_list_adapters").items():
            self.residency.add_resident(name, admission.Admitted(listed["sha256"], listed["variant"]))
        self._lock = threading.Lock()
        admission.install(self.llm.llm_engine, self._admit)

    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    # -- generation ---------------------------------------------------------------------------
    def generate(self, prompts, sampling_params=None, adapter: str | None | Sequence[str | None] = None,
                 use_tqdm: bool = True, contrastive: dict | None | Sequence[dict | None] = None):
        """adapter: one name (or None: the base) for every prompt, or one per prompt. contrastive: decode
        against the base model, {"alpha": (0, 1], "beta": >= 0} (contrastive.py), for every prompt or one
        per prompt (None: plain decoding); only for adapters that tune experts alone."""

        single = isinstance(prompts, (str, dict))
        prompts = [prompts] if single else list(prompts)
        names = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * len(prompts)
        if len(names) != len(prompts):
            raise ValueError(f"{len(names)} adapters given for {len(prompts)} prompts")
        options = list(contrastive) if isinstance(contrastive, (list, tuple)) else [contrastive] * len(prompts)
        if len(options) != len(prompts):
            raise ValueError(f"{len(options)} contrastive options given for {len(prompts)} prompts")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params given for {len(prompts)} prompts")
        options = [self._contrastive(*request) for request in zip(options, names, prompts, params)]
        outputs: list = [None] * len(prompts)
        for k, wave in enumerate(self._waves(names)):
            for name in wave:
                self.residency.lease(name)  # not evicted while the wave is loaded and runs
            try:
                self._make_resident(wave)
                chosen = [i for i, name in enumerate(names) if name in wave or (k == 0 and name is None)]
                done = self._generate([prompts[i] for i in chosen], [params[i] for i in chosen],
                                      [names[i] for i in chosen], [options[i] for i in chosen], use_tqdm)
            finally:
                for name in wave:
                    self.residency.release(name)
            for i, output in zip(chosen, done):
                outputs[i] = output
        return outputs[0] if single else outputs

    def _contrastive(self, option, name: str | None, prompt, params) -> Contrastive | None:
        """The request's option, or ValueError before anything is loaded or run."""
        if option is None:
            return None
        option = parse_contrastive(option)
        if name is None:
            raise ValueError("contrastive decoding contrasts an adapter with its base model: name an adapter")
        refusal = contrastive_refusal(self.llm.llm_engine.vllm_config) or params_problem(params)
        if refusal is not None:
            raise ValueError(refusal)
        with self._lock:
            entry = self.residency.entries.get(name)
            variant = None if entry is None else entry.variant
        if variant or (variant is None and self.catalogue.tunes_non_experts(name)):
            raise ValueError(variant_refusal(name))
        if isinstance(prompt, dict) and (prompt.get("prompt_embeds") is not None or prompt.get("multi_modal_data")):
            raise ValueError(PROMPT_EMBEDS_REFUSAL if prompt.get("prompt_embeds") is not None else
                             "contrastive decoding runs the base model on the same prompt: text or token ids only")
        return option

    def _waves(self, names: list[str | None]) -> list[set[str]]:
        """The adapters named, in groups of at most max_adapters (one group, maybe empty, when they fit)."""
        self._check_admissible(names)
        needed = list(dict.fromkeys(name for name in names if name is not None))
        with self._lock:
            pinned = sum(1 for n in self.residency.entries if self.residency.use(n).pinned and n not in needed)
        room = self.residency.max_resident - pinned
        if room < 1:
            raise CapacityError(f"all {self.residency.max_resident} adapter rows hold adapters loaded by hand; "
                                "unload one to serve others")
        return [set(needed[i:i + room]) for i in range(0, len(needed), room)] or [set()]

    def _make_resident(self, wave: set[str]) -> None:
        """Loads the wave's adapters (leased by the caller), evicting idle adapters outside it by the policy."""
        for name in sorted(wave - set(self.residency.entries)):
            while True:
                if not self.residency.has_room():
                    self._evict_one(wave)
                try:
                    self.load_adapter(name, self.catalogue.path(name), pinned=False)
                    break
                except CapacityError:
                    self._evict_one(wave)

    def _evict_one(self, wave: set[str]) -> None:
        victim = self.residency.victim()
        if victim is None:
            raise CapacityError(f"adapters {', '.join(sorted(wave))} do not fit on the device together "
                                "(rows, slots or memory); pass fewer per generate call or raise max_adapters / "
                                "adapter_slots")
        self.unload_adapter(victim)

    def _generate(self, prompts: list, params: list, names: list[str | None], options: list[Contrastive | None],
                  use_tqdm: bool) -> list:
        if not prompts:
            return []
        requests, per_request = self.vllm_requests(prompts, params, names, options)
        return self.llm.generate(requests, per_request, use_tqdm=use_tqdm)

    def vllm_requests(self, prompts: list, params: list, names: list[str | None],
                      options: list[Contrastive | None] | None = None) -> tuple[list, list]:
        """The prompts and sampling params vLLM's engine gets for these requests to loaded adapters: each
        names its adapter in extra_args and carries the adapter's cache salt. generate() runs them; a caller
        that steps the engine itself (perf/bench_decode.py) adds them to `self.llm.llm_engine`."""
        from vllm import SamplingParams

        options = options or [None] * len(prompts)
        with self._lock:
            entries = {name: self.residency.entries.get(name) for name in set(names) - {None}}
        for name, entry in entries.items():
            if entry is None:  # unloaded since the check
                raise AdapterStateError(f"unknown adapter {name!r}")
        requests, per_request = [], []
        for prompt, name, sp, option in zip(prompts, names, params, options):
            sp = (sp or SamplingParams()).clone()
            prompt = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
            if option is not None and entries[name].variant:  # its files changed since generate() looked
                raise ValueError(variant_refusal(name))
            for arg in (ADAPTER_ARG, VARIANT_ARG, *CONTRASTIVE_ARGS, PAIR_ARG):
                if (sp.extra_args or {}).get(arg) is not None:
                    raise ValueError(f"extra_args[{arg!r}] is set by ExpertWeaveLLM: pass adapter= instead")
            if name is None:
                problem = client_salt_problem(prompt.get("cache_salt"))
                if problem is not None:
                    raise ValueError(problem)
            else:
                sp.extra_args = {**(sp.extra_args or {}), ADAPTER_ARG: name,
                                 **({VARIANT_ARG: name} if entries[name].variant else {}),
                                 **(contrastive_args(option) if option is not None else {})}
                prompt["cache_salt"] = adapter_cache_salt(entries[name].sha256, prompt.get("cache_salt"))
            requests.append(prompt)
            per_request.append(sp)
        return requests, per_request

    def _admit(self, name: str) -> admission.Admitted:
        """The adapter as requests for it may start now (vLLM's engine asks as it admits each), or ValueError
        saying why they may not."""
        with self._lock:
            entries = self.residency.entries
            if name not in entries:
                raise ValueError(f"unknown adapter {name!r} (loaded: {', '.join(sorted(entries)) or 'none'})")
            if not self.residency.admits(name):
                raise ValueError(f"adapter {name!r} is being unloaded")
            return entries[name]

    def _check_admissible(self, names: list[str | None]) -> None:
        """Refuses the whole batch before any of it reaches the engine (vLLM admits request by request)."""
        for name in set(names) - {None}:
            with self._lock:
                if self.residency.states.get(name) == UNLOADING:
                    raise AdapterStateError(f"adapter {name!r} is being unloaded")
                if name in self.residency.entries:
                    continue
            if self.catalogue.path(name) is None:
                known = sorted(set(self.residency.entries) | set(self.catalogue.names()))
                raise AdapterStateError(f"unknown adapter {name!r} (not loaded and not in the catalogue: "
                                        f"{', '.join(known) or 'none'})")

    # -- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path, pinned: bool = True) -> dict:
        """Validates here, then loads in every worker; errors leave the engine as it was. An adapter
        loaded by hand (pinned) is never evicted for another; unload it by hand."""
        check_adapter(path, self.geometry)  # the workers' load reads and checks the data
        with self._lock:
            if name in self.residency.entries:
                raise AdapterStateError(f"adapter {name!r} is already loaded")
        answers = self.llm.collective_rpc("expertweave_load_adapter", args=(name, str(path)))
        outcome = agreement.check_load(name, answers)
        if outcome.roll_back:
            self.llm.collective_rpc("expertweave_discard_adapter", args=(name,))
        if outcome.error is not None:
            capacity = all(a.get("capacity") for a in answers if "error" in a)
            raise (CapacityError if capacity else ExpertWeaveError)(outcome.error)
        info = outcome.info
        with self._lock:
            self.residency.add_resident(name, admission.Admitted(info["sha256"], info["variant"]), pinned)
        return info

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Waits up to timeout seconds (None: no limit), then raises AdapterBusyError, changing nothing."""
        with self._lock:
            if name not in self.residency.entries:
                raise AdapterStateError(f"unknown adapter {name!r}")
            if not self.residency.begin_leave(name, UNLOADING):
                raise AdapterStateError(f"adapter {name!r} is being unloaded")
        left = False
        try:
            lifetime.unload_when_idle(self.llm, name, timeout, lambda: self.residency.use(name).leases)
            left = True
        finally:
            with self._lock:
                self.residency.end_leave(name, left)

    def list_adapters(self) -> dict:
        return self._rpc("expertweave_list_adapters")

    def memory_report(self) -> MemoryReport:
        return MemoryReport.from_json(self._rpc("expertweave_memory_report"))

    def shutdown(self) -> None:
        """Stops the engine and gives its expert memory back (an in-process engine keeps the
        process's address space, so this matters when one process starts several engines)."""
        self._rpc("expertweave_close")
        shutdown_llm(self.llm)
