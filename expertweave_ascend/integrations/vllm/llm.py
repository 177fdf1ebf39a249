"""ExpertWeaveLLM: vllm.LLM serving a base model and many ESFT adapters in one engine."""

import asyncio
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from prometheus_client import CollectorRegistry

from ...adapters import check_adapter
from ...catalogue import AdapterCatalogue
from ...contrastive import Contrastive
from ...errors import AdapterStateError, CapacityError
from ...geometry import BaseGeometry
from ...reports import MemoryReport
from ...residency import Residency
from . import admission, platforms
from .contrastive import PROMPT_EMBEDS_REFUSAL, params_problem, variant_refusal
from .engine import WORKER_EXTENSION, client_salt_problem, engine_config, refuse_data_parallelism, shutdown_llm
from .frontend import AdapterFrontEnd, AdapterUnavailable, Lease
from .metrics import AdapterMetrics
from .workers import Workers

class ExpertWeaveLLM:
    """A vllm.LLM whose requests each name an adapter (or None for the base model).

    Adapters are served by name from a catalogue: `adapters` (NAME -> path; the first max_adapters are
    loaded at start) and every subdirectory of `adapter_root`. generate loads the adapters its prompts
    name, evicting idle ones by `eviction_policy` (residency.py); prompts naming more adapters than fit
    at once run in waves, each wave's adapters loaded before it runs. Adapters loaded by hand
    (load_adapter) stay until unloaded by hand.

    This is the offline driver of the engine's AdapterFrontEnd (frontend.py), which the server drives too:
    it runs on an event loop of this object's own thread, so an unload from another thread while generate
    runs is served (that needs vLLM's engine in its own process, the default). Unload admits no new
    requests of the adapter and waits until the engine's workers report none of them running or queued.
    """

    def __init__(self, model: str, adapters: dict[str, str] | None = None, *, max_adapters: int = 8,
                 adapter_slots: int | None = None, adapter_memory_bytes: int | None = None,
                 granularity: int | None = None, adapter_root: str | Path | None = None,
                 host_adapter_bytes: int = 0, eviction_policy: str = "lru",
                 consolidate_rel_l2: float | None = None, shared_experts: bool = False, **llm_kwargs):
        refuse_data_parallelism("ExpertWeaveLLM", llm_kwargs, os.environ)
        from vllm import LLM

        self.model = model
        geometry = BaseGeometry.from_checkpoint(model)
        adapters = dict(adapters or {})
        for path in list(adapters.values())[max_adapters:]:  # the first ones are checked by engine_config
            shared_experts |= bool(check_adapter(path, geometry).shared_layers)
        residency = Residency(max_adapters, eviction_policy)
        preload = dict(list(adapters.items())[:max_adapters])
        additional = dict(llm_kwargs.pop("additional_config", None) or {})
        additional["expertweave"] = engine_config(
            geometry, preload, max_adapters, adapter_slots, adapter_memory_bytes, granularity,
            host_adapter_bytes, warm=adapter_root is not None or len(adapters) > max_adapters,
            consolidate_rel_l2=consolidate_rel_l2, shared_experts=shared_experts)
        for key, value in platforms.current().engine_defaults(set(llm_kwargs)).items():
            llm_kwargs.setdefault(key, value)
        llm_kwargs["logits_processors"] = admission.with_processors(llm_kwargs.get("logits_processors"))
        for key, value in platforms.current().engine_environment().items():
            os.environ.setdefault(key, value)  # read by the engine processes this one starts
        self.llm = LLM(model=model, additional_config=additional, worker_extension_cls=WORKER_EXTENSION,
                       **llm_kwargs)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="expertweave-front-end", daemon=True)
        self._thread.start()
        self.front_end = AdapterFrontEnd(
            self.llm.llm_engine, Workers.of_llm(self.llm), geometry, AdapterCatalogue(adapter_root, adapters),
            residency, AdapterMetrics(lambda: residency.entries, CollectorRegistry()),
            adapter_root=None if adapter_root is None else str(adapter_root), wait_s=0)
        self._run(self.front_end.start())

    def _run(self, coroutine):
        """Runs a front-end coroutine on the front-end's loop and returns its result, from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

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
            leases: list[Lease] = []
            try:
                for name in sorted(wave):  # each held (never evicted) while the wave is loaded and runs
                    leases.append(self._acquire(name, wave))
                chosen = [i for i, name in enumerate(names) if name in wave or (k == 0 and name is None)]
                done = self._generate([prompts[i] for i in chosen], [params[i] for i in chosen],
                                      [names[i] for i in chosen], [options[i] for i in chosen], use_tqdm)
            finally:
                for lease in leases:
                    self._loop.call_soon_threadsafe(self.front_end.release, lease.name)
            for i, output in zip(chosen, done):
                outputs[i] = output
        return outputs[0] if single else outputs

    def _acquire(self, name: str, wave: set[str]) -> Lease:
        try:
            return self._run(self.front_end.acquire(name))
        except AdapterUnavailable:
            raise CapacityError(f"adapters {', '.join(sorted(wave))} do not fit on the device together (rows, slots "
                                "or memory); pass fewer per generate call or raise max_adapters / adapter_slots") \
                from None

    def _contrastive(self, option, name: str | None, prompt, params) -> Contrastive | None:
        """The request's option, or ValueError before anything is loaded or run."""
        if option is None:
            return None
        option = self._run(self.front_end.contrastive(option, name))
        problem = params_problem(params)
        if problem is not None:
            raise ValueError(problem)
        if isinstance(prompt, dict) and (prompt.get("prompt_embeds") is not None or prompt.get("multi_modal_data")):
            raise ValueError(PROMPT_EMBEDS_REFUSAL if prompt.get("prompt_embeds") is not None else
                             "contrastive decoding runs the base model on the same prompt: text or token ids only")
        return option

    def _waves(self, names: list[str | None]) -> list[set[str]]:
        """The adapters named, in groups that fit beside the adapters loaded by hand (one group, maybe empty,
        when they fit); refuses the whole batch before any of it runs (vLLM admits request by request)."""
        needed = list(dict.fromkeys(name for name in names if name is not None))
        residency = self.front_end.residency
        for name in needed:
            if self.front_end.unloading(name):
                raise AdapterStateError(f"adapter {name!r} is being unloaded")
            if not self._run(self.front_end.known(name)):
                known = sorted(set(residency.entries) | set(self.front_end.catalogue.names()))
                raise AdapterStateError(f"unknown adapter {name!r} (not loaded and not in the catalogue: "
                                        f"{', '.join(known) or 'none'})")
        room = residency.max_resident - len(set(residency.pinned()) - set(needed))
        if room < 1:
            raise CapacityError(f"all {residency.max_resident} adapter rows hold adapters loaded by hand; "
                                "unload one to serve others")
        return [set(needed[i:i + room]) for i in range(0, len(needed), room)] or [set()]

    def _generate(self, prompts: list, params: list, names: list[str | None], options: list[Contrastive | None],
                  use_tqdm: bool) -> list:
        if not prompts:
            return []
        requests, per_request = self.vllm_requests(prompts, params, names, options)
        return self.llm.generate(requests, per_request, use_tqdm=use_tqdm)

    def vllm_requests(self, prompts: list, params: list, names: list[str | None],
                      options: list[Contrastive | None] | None = None) -> tuple[list, list]:
        """The prompts and sampling params vLLM's engine gets for these requests to loaded adapters: each
        names its adapter in extra_args and carries the adapter's cache salt (admission.request_fields).
        generate() runs them; a caller that steps the engine itself (perf/bench_decode.py) adds them to
        `self.llm.llm_engine`."""
        from vllm import SamplingParams

        options = options or [None] * len(prompts)
        contents = {name: self.front_end.residency.content(name) for name in set(names) - {None}}
        for name, content in contents.items():
            if content is None:  # unloaded since the check
                raise AdapterStateError(f"unknown adapter {name!r}")
        requests, per_request = [], []
        for prompt, name, sp, option in zip(prompts, names, params, options):
            sp = (sp or SamplingParams()).clone()
            prompt = dict(prompt) if isinstance(prompt, dict) else {"prompt": prompt}
            problem = admission.client_args_problem(sp.extra_args, "extra_args", "ExpertWeaveLLM: pass adapter= "
                                                    "and contrastive= instead")
            if problem is None and name is None:
                problem = client_salt_problem(prompt.get("cache_salt"))
            if problem is not None:
                raise ValueError(problem)
            if name is not None:
                if option is not None and contents[name].variant:  # its files changed since generate() looked
                    raise ValueError(variant_refusal(name))
                sp.extra_args, prompt["cache_salt"] = admission.request_fields(
                    name, contents[name], option, sp.extra_args, prompt.get("cache_salt"))
            requests.append(prompt)
            per_request.append(sp)
        return requests, per_request

    # -- adapters -----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path) -> dict:
        """Validates here, then loads in every worker; errors leave the engine as it was. An adapter
        loaded by hand is never evicted for another; unload it by hand."""
        return self._run(self.front_end.load(name, path)).summary()

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        """Waits up to timeout seconds (None: no limit), then raises AdapterBusyError, changing nothing."""
        self._run(self.front_end.unload(name, timeout))

    def list_adapters(self) -> dict:
        return {name: asdict(listed) for name, listed in self._run(self.front_end.workers.adapters()).items()}

    def memory_report(self) -> MemoryReport:
        return self._run(self.front_end.workers.memory_report())

    def shutdown(self) -> None:
        """Stops the engine and gives its expert memory back (an in-process engine keeps the
        process's address space, so this matters when one process starts several engines)."""
        self._run(self.front_end.workers.close())
        shutdown_llm(self.llm)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
