"""AdapterFrontEnd: the adapter life cycle of one engine, driven by the HTTP server and by ExpertWeaveLLM.

It owns everything between an adapter's name and the workers' slots: the catalogue lookup, the residency
(residency.py: which adapters are on the device, their content and use), admission (admission.py, in
front of the engine client's own registration of each request), leases, loads (with rank agreement and
rollback, agreement.py), evictions, unloads that wait for the adapter's requests (lifetime.py), the
host-tier prefetch, and the /metrics counts. It is asynchronous: the server runs it on its event loop
and awaits AsyncLLM; ExpertWeaveLLM runs it on an event loop of its own thread over vllm.LLM.

A request for a catalogued adapter that is not on the device waits here while the adapter loads: the
load runs in the workers' loader threads (loader.py) while the engine keeps stepping, the front-end
collects the ranks' answers between steps and admits the adapter's requests only once every rank
published it and they agree. When the device has no row (or no slots or bytes) for the load, the
residency's policy picks an idle adapter to evict; when every resident adapter is in use the load waits
for a lease to end (at most wait_s; with wait_s 0 it fails at once, as offline, where nothing else
runs). Meanwhile the waiting adapters are prefetched into the workers' host tier, in the order their
requests came, as many as the host tier holds, so only the copy to the device is left when room frees up.
"""

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ...adapters import check_adapter
from ...catalogue import AdapterCatalogue
from ...contrastive import Contrastive, parse_contrastive
from ...errors import AdapterStateError, CapacityError, ConfinementError, ExpertWeaveError
from ...files import confined
from ...geometry import BaseGeometry
from ...loader import LoadAnswer
from ...residency import EVICTING, UNLOADING, Content, Residency
from . import admission, agreement, lifetime
from .contrastive import variant_refusal
from .engine import contrastive_refusal
from .layer import SHARED_EXPERTS_REFUSAL
from .metrics import AdapterMetrics
from .workers import Workers

logger = logging.getLogger("expertweave")

COLLECT_S = 0.001  # how often finished loads are collected from the workers (each is a step-gap RPC)
EVICT_TIMEOUT_S = 30.0  # an idle adapter's last aborts land within a step or two
MAX_NAME = 128


class AdapterNotFound(AdapterStateError):
    """Not on the device (and, for a request, not in the catalogue)."""


class AdapterLoadFailed(ExpertWeaveError):
    """The adapter's files or the workers refused the load; public_message says it without the files' content."""

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public_message = public or message


class LoadCapacityError(AdapterLoadFailed, CapacityError):
    """The workers have no slots, rows or bytes for the adapter beside the pinned ones."""


class AdapterUnavailable(CapacityError):
    """No room for the adapter within the wait: every resident adapter is in use or pinned."""


class AdapterConflict(AdapterStateError):
    """The adapter (or its name) is busy: loading, being unloaded or evicted, or its name is taken."""


@dataclass(frozen=True)
class Lease:
    """One request's hold on an adapter, from admission until its response ends (release)."""
    name: str
    content: Content
    hit: bool  # it was on the device already
    wait_s: float  # how long the request waited for it to be loaded

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What the response tells the client: x-expertweave-adapter hit|miss, and the wait in ms."""
        return [(b"x-expertweave-adapter", b"hit" if self.hit else b"miss"),
                (b"x-expertweave-load-wait-ms", f"{self.wait_s * 1e3:.1f}".encode())]


def adapter_name_problem(name: str) -> str | None:
    """Why an adapter could not be served under this name, or None."""
    if not name or len(name) > MAX_NAME:
        return f"adapter name {name[:MAX_NAME]!r}: expected 1 to {MAX_NAME} characters"
    if not name.isprintable() or name != name.strip():
        return f"adapter name {name!r}: control characters and surrounding spaces are not allowed"
    return None


class AdapterFrontEnd:
    def __init__(self, engine_client, workers: Workers, geometry: BaseGeometry, catalogue: AdapterCatalogue,
                 residency: Residency, metrics: AdapterMetrics, *, base_name: str | None = None,
                 adapter_root: str | None = None, wait_s: float = 60.0, host_budget_bytes: int = 0):
        self.engine = engine_client  # vLLM's AsyncLLM or LLMEngine: its config, its live requests
        self.workers = workers
        self.geometry = geometry
        self.catalogue = catalogue
        self.residency = residency
        self.metrics = metrics
        self.base_name = base_name
        self.adapter_root = adapter_root  # loads by hand stay inside it; errors leave its path out
        self.wait_s = wait_s
        self.host_budget_bytes = host_budget_bytes  # the workers' host tier: bounds the prefetch horizon
        self._tasks: dict[str, asyncio.Task] = {}  # on-demand loads, in the order their requests came
        self._answers: dict[str, dict[int, LoadAnswer]] = {}  # name -> rank -> its background load's answer
        self._waiting_for: dict[str, asyncio.Future] = {}  # name -> every rank's answers, once all came
        self._collector: asyncio.Task | None = None
        self._room_lock = asyncio.Lock()  # each binds to the loop that drives this front-end when first used
        self._changed = asyncio.Event()
        self._prefetched: set[str] = set()
        self._mean_packed_bytes: float | None = None

    async def start(self) -> None:
        """Takes in the adapters the engine loaded at start, and checks every request the engine client admits."""
        for name, listed in (await self.workers.adapters()).items():
            self.residency.add_resident(name, Content(listed.path, listed.sha256, listed.variant))
        admission.install(self.engine, self.admit)

    # -- admission and leases -----------------------------------------------------------------
    def admit(self, name: str) -> Content:
        """The adapter as requests for it may start now (vLLM's engine client asks as it admits each, on its
        own thread offline), or ValueError saying why they may not."""
        content = self.residency.content(name)
        if content is None:
            loaded = ", ".join(sorted(self.residency.entries)) or "none"
            raise ValueError(f"unknown adapter {name!r} (loaded: {loaded})")
        if not self.residency.admits(name):
            raise ValueError(f"adapter {name!r} is being unloaded")
        return content

    async def known(self, name: str) -> bool:
        """On the device already, or in the catalogue (a look at the disk, off the event loop)."""
        if self.residency.content(name) is not None:
            return True
        try:
            return await asyncio.to_thread(self.catalogue.path, name) is not None
        except ConfinementError:
            return False

    def unloading(self, name: str) -> bool:
        return self.residency.state(name) == UNLOADING

    async def tunes_non_experts(self, name: str) -> bool | None:
        """Whether the adapter tunes non-expert modules, known before it is loaded (None: unknown)."""
        content = self.residency.content(name)
        if content is not None:
            return content.variant
        return await asyncio.to_thread(self.catalogue.tunes_non_experts, name)

    async def contrastive(self, value, name: str | None) -> Contrastive | None:
        """A request's contrastive option (None: plain decoding), or ValueError: the option, the adapter and
        this engine must allow it. The request's own shape (sampling parameters) is the driver's to check."""
        if value is None:
            return None
        option = parse_contrastive(value)
        if name is None:
            how = "name an adapter" if self.base_name is None else \
                f"set \"model\" to an ESFT adapter (the base model is {self.base_name!r})"
            raise ValueError(f"contrastive decoding contrasts an adapter with its base model: {how}")
        refusal = contrastive_refusal(self.engine.vllm_config)
        if refusal is not None:
            raise ValueError(refusal)
        if await self.tunes_non_experts(name):
            raise ValueError(variant_refusal(name))
        return option

    async def acquire(self, name: str) -> Lease:
        """Leases the adapter for one request, once it is on the device. Raises AdapterNotFound,
        AdapterLoadFailed (the files were refused) or AdapterUnavailable."""
        if self.residency.serving(name):
            self.metrics.hits[name] += 1
            self.residency.lease(name)
            return Lease(name, self.residency.content(name), True, 0.0)
        self.metrics.misses[name] += 1
        use = self.residency.use(name)
        use.waiting += 1
        started = time.monotonic()
        try:
            while not self.residency.serving(name):
                remaining = started + self.wait_s - time.monotonic()
                if self.wait_s and remaining <= 0:
                    raise AdapterUnavailable(self._busy(name))
                task = self._tasks.get(name)
                if task is None:
                    task = self._tasks[name] = asyncio.create_task(self._load_task(name))
                done, _ = await asyncio.wait({task}, timeout=remaining if self.wait_s else None)
                if done and task.result() is not None:
                    error = task.result()
                    raise type(error)(*error.args)  # each waiter its own
        finally:
            use.waiting -= 1
            waited = time.monotonic() - started
            self.metrics.load_wait_seconds.observe(waited)
        self.residency.lease(name)
        return Lease(name, self.residency.content(name), False, waited)

    def release(self, name: str) -> None:
        self.residency.release(name)
        self._changed.set()

    def _busy(self, name: str) -> str:
        if self.wait_s:
            return (f"adapter {name!r} could not be loaded within {self.wait_s:g} s: every one of the "
                    f"{self.residency.max_resident} device-resident adapters has requests in flight; retry later")
        return (f"adapter {name!r} does not fit on the device beside the adapters in use (rows, slots or memory): "
                f"{', '.join(sorted(self.residency.entries))}")

    # -- loads by hand and unloads ------------------------------------------------------------
    async def load(self, name: str, path: str | Path) -> LoadAnswer:
        """Loads an adapter by hand (pinned: never evicted, only unloaded by hand), evicting idle catalogued
        adapters for a row once its files passed every check made here. Raises AdapterStateError (the name),
        ConfinementError / AdapterError / ExpertWeaveError (the files, or an adapter this engine does not serve),
        AdapterConflict (no row), CapacityError / AdapterLoadFailed (the workers refused): nothing changed then,
        but for adapters evicted before a refusal of the workers (idle ones, which a request loads again)."""
        problem = adapter_name_problem(name)
        if problem is not None:
            raise AdapterStateError(problem)
        if self.residency.state(name) is not None or name == self.base_name:
            raise AdapterStateError(f"adapter name {name!r} is already in use")
        try:
            resolved = await asyncio.to_thread(self._checked_path, path)  # files may be slow: off the loop
        except ExpertWeaveError as e:
            logger.info("ExpertWeave: adapter %r not loaded: %s", name, e)  # the full message, for the operator
            raise
        await self._reserve_row(name)
        content = None
        try:
            with self.metrics.timed(self.metrics.load_seconds):
                answers = await self.workers.load(name, str(resolved))
            outcome = agreement.check_load(name, answers)
            if outcome.roll_back:
                await self.workers.discard(name)
            if outcome.error is not None:
                logger.info("ExpertWeave: adapter %r not loaded: %s", name, outcome.error)
                public = self.public(outcome.public_error or outcome.error)
                raise (LoadCapacityError if outcome.capacity else AdapterLoadFailed)(outcome.error, public)
            content = Content(str(path), outcome.loaded.sha256, outcome.loaded.variant)
        finally:
            self.residency.end_load(name, content, pinned=True)
        self.metrics.loads[name] += 1
        logger.info("ExpertWeave: loaded adapter %r from %s (sha256 %s, %d experts)", name, resolved,
                    content.sha256, outcome.loaded.experts)
        return outcome.loaded

    def _checked_path(self, path: str | Path) -> Path:
        """The adapter directory to load: inside the adapter root when there is one, a valid adapter, and one
        this engine serves (checked before a load by hand makes room: a refusal then would have evicted an
        adapter for nothing)."""
        resolved = confined(Path(self.adapter_root), path) if self.adapter_root is not None else Path(path)
        adapter = check_adapter(resolved, self.geometry)  # the workers' load reads and checks the data
        if adapter.shared_layers and not (self.engine.vllm_config.additional_config or {}).get(
                "expertweave", {}).get("shared_experts"):
            raise ExpertWeaveError(f"{resolved}: {SHARED_EXPERTS_REFUSAL}")
        return resolved

    async def _reserve_row(self, name: str) -> None:
        """Takes a row and the name for a load by hand, evicting idle catalogued adapters while no row is free."""
        async with self._room_lock:
            while not self.residency.has_free_row():
                victim = self.residency.victim()
                if victim is None:
                    raise AdapterConflict(f"all {self.residency.max_resident} adapter rows hold adapters loaded by "
                                          "hand or in use (max adapters): unload one first")
                await self._evict(victim)
                if self.residency.state(victim) is not None:
                    raise AdapterConflict(f"adapter {victim!r} would have made room but still has requests: "
                                          "retry later")
            if self.residency.state(name) is not None:  # taken while rows were made
                raise AdapterConflict(f"adapter name {name!r} is already in use")
            self.residency.begin_load(name)

    async def unload(self, name: str, timeout: float | None) -> None:
        """Admits no new request of the adapter, waits up to timeout seconds (None: no limit) for its requests,
        then takes it off every rank. Raises AdapterStateError (not loaded), AdapterConflict (on its way out
        already) or AdapterBusyError (still busy at the timeout); nothing changed then."""
        state = self.residency.state(name)
        if self.residency.content(name) is None:
            raise AdapterNotFound(f"adapter {name!r} is not loaded")
        if not self.residency.begin_leave(name, UNLOADING):
            what = "already being unloaded" if state == UNLOADING else "being evicted"
            raise AdapterConflict(f"adapter {name!r} is {what}")
        content = self.residency.content(name)
        left = False
        try:
            with self.metrics.timed(self.metrics.unload_seconds):
                await lifetime.unload_when_idle(self.workers, self.engine, name, timeout,
                                                lambda: self.residency.use(name).leases)
            left = True
        finally:
            self.residency.end_leave(name, left)
        self._changed.set()
        self.metrics.unloads.inc()
        self.metrics.forget(name)
        logger.info("ExpertWeave: unloaded adapter %r (sha256 %s)", name, content.sha256)

    def public(self, message: str) -> str:
        """An error message fit for a client: without the adapter root's path."""
        root = self.adapter_root
        if root is None:
            return message
        return message.replace(str(Path(root).resolve()) + "/", "").replace(str(Path(root)) + "/", "")

    # -- on-demand loads ----------------------------------------------------------------------
    async def _load_task(self, name: str) -> ExpertWeaveError | None:
        """Loads the adapter; None when loaded (or nobody waits for it any more), else the error its waiters get."""
        try:
            return await self._load(name)
        finally:
            self._tasks.pop(name, None)

    async def _load(self, name: str) -> ExpertWeaveError | None:
        try:
            path = await asyncio.to_thread(self.catalogue.path, name)
        except ConfinementError as e:
            return AdapterNotFound(str(e))
        if path is None:
            return AdapterNotFound(f"adapter {name!r} is not in the catalogue (it is gone from the adapter root)")
        use = self.residency.use(name)
        while use.waiting:
            if self.residency.serving(name):  # loaded by hand meanwhile, or its eviction was called off
                return None
            if self.residency.state(name) is not None:  # on its way out: load it again once it is gone
                await self._wait_change()
                continue
            room, victim = await self._take_room(name)
            if not room:
                if not self.wait_s:
                    return AdapterUnavailable(self._busy(name))
                await self._prefetch(name, str(path))
                await self._wait_change()
                continue
            content, answers = None, None
            evicting = [victim] if victim is not None else []  # until the load's start evicts it
            try:
                answers = await self._run_load(name, str(path), evicting)
                outcome = None if answers is None else agreement.check_load(name, answers)
                if outcome is not None and outcome.roll_back:
                    await self.workers.discard(name)
                if outcome is not None and outcome.error is None:
                    content = Content(str(path), outcome.loaded.sha256, outcome.loaded.variant)
            finally:
                self.residency.end_load(name, content)  # first: a victim that stays needs this row back
                self._changed.set()
                for still in evicting:  # its last requests are finishing, or the start failed
                    async with self._room_lock:  # still evicting: no request may lease it meanwhile
                        await self._finish_eviction(still)
            if answers is None:  # the victim still had a request finishing: evicted the slow way, then again
                continue
            if content is not None:
                self._loaded(name, str(path), outcome.loaded, answers[0])
                return None
            if not outcome.capacity:
                logger.info("ExpertWeave: adapter %r not loaded: %s", name, outcome.error)
                return AdapterLoadFailed(self.public(outcome.public_error or outcome.error))
            async with self._room_lock:  # no slots or bytes for it: make some
                victim = self.residency.victim()
                if victim is not None:
                    await self._evict(victim)
            if victim is None:
                if not self.wait_s:
                    return AdapterUnavailable(self._busy(name))
                await self._wait_change()
        return None

    async def _take_room(self, name: str) -> tuple[bool, str | None]:
        """Counts the load in if a device row is free or an idle adapter can give up its row: (True, that
        adapter or None), which the load's start evicts; (False, None) when every resident one is busy."""
        async with self._room_lock:
            victim = None
            if not self.residency.has_room():
                victim = self.residency.victim()
                if victim is None:
                    return False, None
                self.residency.begin_leave(victim, EVICTING)
            self.residency.begin_load(name)
            return True, victim

    async def _wait_change(self) -> None:
        """Until a lease ends or an adapter leaves the device (at most half a second)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), 0.5)
        except asyncio.TimeoutError:
            pass

    async def _run_load(self, name: str, path: str, evicting: list[str]) -> list[LoadAnswer] | None:
        """Every rank's load answer; None when the victim (evicting's one name, if any) could not be evicted
        at once (the caller then evicts it by polling, and the load must take its room again). The victim
        leaves `evicting` once gone."""
        victim = evicting[0] if evicting else None
        with self.metrics.timed(self.metrics.load_seconds):
            # The eviction travels with the start: one step-gap round trip instead of two.
            live = lifetime.live_request_ids(self.engine) if victim is not None else []
            started = await self.workers.start_load(name, path, victim, live)
            if victim is not None:
                evicted = [s.evicted for s in started]
                if any(evicted) and not all(evicted):
                    raise ExpertWeaveError(f"adapter {victim!r}: the tensor-parallel ranks disagree on whether "
                                           "it is idle; the engine's ranks no longer hold the same adapters")
                if not all(evicted):
                    return None
                self._evicted(victim)
                evicting.clear()
            if any(s.error is not None for s in started):
                return [LoadAnswer(error=s.error) if s.error is not None else LoadAnswer() for s in started]
            future = self._waiting_for[name] = asyncio.get_running_loop().create_future()
            if self._collector is None or self._collector.done():
                self._collector = asyncio.create_task(self._collect())
            return await future

    async def _collect(self) -> None:
        """Collects finished loads from every rank while some load is outstanding."""
        while self._waiting_for:
            try:
                ranks = await self.workers.collect()
            except Exception as e:  # the engine is gone: every load waiting on it fails with the cause
                for future in self._waiting_for.values():
                    if not future.done():
                        future.set_exception(e)
                self._waiting_for.clear()
                return
            for rank, collected in enumerate(ranks):
                for name, answer in collected.done.items():
                    self._answers.setdefault(name, {})[rank] = answer
            for name in [n for n, got in self._answers.items() if len(got) == len(ranks)]:
                got = self._answers.pop(name)
                future = self._waiting_for.pop(name, None)
                if future is not None and not future.done():
                    future.set_result([got[r] for r in range(len(ranks))])
            await asyncio.sleep(COLLECT_S)

    def _loaded(self, name: str, path: str, loaded: LoadAnswer, first: LoadAnswer) -> None:
        self._prefetched.discard(name)
        self._mean_packed_bytes = loaded.bytes if self._mean_packed_bytes is None else \
            0.8 * self._mean_packed_bytes + 0.2 * loaded.bytes
        self.metrics.loads[name] += 1
        self.metrics.loads_by_source.labels(first.source or "disk").inc()
        logger.info("ExpertWeave: loaded adapter %r on demand from %s (%s, read %.3f s, copy %.3f s)", name, path,
                    first.source, first.read_s, first.copy_s)

    # -- evictions ----------------------------------------------------------------------------
    async def _evict(self, name: str) -> None:
        """Unloads an idle adapter; under the room lock, so no load of it starts before it is gone."""
        if self.residency.begin_leave(name, EVICTING):  # its requests wait for a reload (admission refuses it)
            await self._finish_eviction(name)

    async def _finish_eviction(self, name: str) -> None:
        """Waits for the evicting adapter's last requests, then takes it off the device; if it cannot go (a
        request reached the engine without a lease, or the engine refused), it stays and is served again."""
        try:
            await lifetime.unload_when_idle(self.workers, self.engine, name, EVICT_TIMEOUT_S)
        except Exception as e:  # AdapterBusyError, or the workers' own refusal
            self.residency.end_leave(name, left=False)
            self._changed.set()
            logger.warning("ExpertWeave: adapter %r not evicted: %s", name, lifetime.worker_message(e))
            return
        self._evicted(name)

    def _evicted(self, name: str) -> None:
        self._changed.set()
        self.residency.end_leave(name, left=True)
        self.metrics.evictions.inc()
        self.metrics.forget(name)
        logger.info("ExpertWeave: evicted adapter %r (%s policy)", name, self.residency.policy)

    # -- the host tier ------------------------------------------------------------------------
    def horizon(self) -> int:
        """How many waiting adapters to prefetch: as many as the host tier holds, by the mean packed size
        measured so far (one before any was measured)."""
        if self.host_budget_bytes <= 0:
            return 0
        if not self._mean_packed_bytes:
            return 1
        return max(1, int(self.host_budget_bytes // self._mean_packed_bytes))

    async def _prefetch(self, name: str, path: str) -> None:
        """Packs a waiting adapter into the host tier, if it is within the horizon in order of arrival."""
        if name in self._prefetched:
            return
        waiting = [n for n in self._tasks if self.residency.content(n) is None]  # tasks start in arrival order
        if name not in waiting[:self.horizon()]:
            return
        self._prefetched.add(name)
        await self.workers.prefetch(name, path)

    async def warm_host_tier(self) -> None:
        """Fills the workers' host tier from the catalogue, in its order, as far as the budget goes."""
        def entries() -> list[tuple[str, str]]:
            out = []
            for name in self.catalogue.names():
                try:
                    path = self.catalogue.path(name)
                except ConfinementError:
                    continue
                if path is not None:
                    out.append((name, str(path)))
            return out

        await self.workers.warm_host_tier(await asyncio.to_thread(entries))

    # -- views --------------------------------------------------------------------------------
    async def states(self) -> dict[str, str]:
        """Every catalogued or loaded adapter's tier: device, loading, host or disk."""
        tiers = await self.workers.tiers()
        on_device = self.residency.entries
        names = set(await asyncio.to_thread(self.catalogue.names)) | set(on_device)
        host = set(tiers.host)
        loading = set(tiers.loading) | self.residency.loading
        return {n: "device" if n in on_device else "loading" if n in loading
                else "host" if n in host else "disk" for n in sorted(names)}

    async def refresh_metrics(self, every_s: float) -> None:
        """Fetches the workers' figures for /metrics every every_s seconds while the engine answers."""
        while True:
            try:
                figures = await self.workers.metrics()
            except Exception as e:  # the engine is gone; the server is stopping
                logger.info("ExpertWeave: metrics no longer refreshed: %s", lifetime.worker_message(e))
                return
            self.metrics.update(figures, self.base_name or "")
            await asyncio.sleep(every_s)

