"""Adapters by name for the server: a request for a catalogued adapter that is not on the device is held
here while the adapter loads, then joins the engine's batches like any other.

Loads run in the workers' loader threads (loader.py) while the engine keeps stepping; this front-end
starts them (expertweave_start_load), collects the ranks' answers between steps
(expertweave_collect_loads) and admits the adapter's requests only once every rank published it and
they agree (agreement.py). When the device has no row (or no slots or bytes) for the load, the residency
policy (residency.py) picks an idle adapter to evict; when every resident adapter is in use the load
waits for a lease to end, and a request that waits longer than its bound gets AdapterUnavailable (503).
Meanwhile the waiting adapters are prefetched into the workers' host tier, in the order their requests
came, as many as the host tier holds, so only the copy to the device is left when room frees up.
"""

import asyncio
import logging
import time
from dataclasses import dataclass

from ...catalogue import AdapterCatalogue
from ...errors import ConfinementError, ExpertWeaveError
from ...residency import EVICTING, Residency
from . import agreement, lifetime

logger = logging.getLogger("expertweave")

COLLECT_S = 0.001  # how often finished loads are collected from the workers (each is a step-gap RPC)
EVICT_TIMEOUT_S = 30.0  # an idle adapter's last aborts land within a step or two


class AdapterNotFound(ExpertWeaveError):
    pass


class AdapterLoadFailed(ExpertWeaveError):
    pass


class AdapterUnavailable(ExpertWeaveError):
    pass


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter on the device, as the front-end knows it."""
    path: str
    sha256: str
    variant: bool = False  # it tunes non-expert modules: its requests carry VARIANT_ARG (grouping.py)


@dataclass(frozen=True)
class Lease:
    entry: AdapterEntry
    hit: bool  # it was on the device already
    wait_s: float  # how long the request waited for it to be loaded

    def headers(self) -> list[tuple[bytes, bytes]]:
        """What the response tells the client: x-expertweave-adapter hit|miss, and the wait in ms."""
        return [(b"x-expertweave-adapter", b"hit" if self.hit else b"miss"),
                (b"x-expertweave-load-wait-ms", f"{self.wait_s * 1e3:.1f}".encode())]


class TieredAdapters:
    def __init__(self, front_end, catalogue: AdapterCatalogue, residency: Residency, wait_s: float,
                 host_budget_bytes: int = 0):
        self.front_end = front_end  # its engine, metrics and public()
        self.catalogue = catalogue
        self.residency = residency
        self.wait_s = wait_s
        self._tasks: dict[str, asyncio.Task] = {}
        self._answers: dict[str, dict[int, dict]] = {}  # name -> rank -> its load answer
        self._waiting_for: dict[str, asyncio.Future] = {}  # name -> every rank's answers, once all came
        self._collector: asyncio.Task | None = None
        self._room_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._prefetched: set[str] = set()
        self._mean_packed_bytes: float | None = None
        self.host_budget_bytes = host_budget_bytes  # the workers' host tier: bounds the prefetch horizon

    # -- requests -----------------------------------------------------------------------------
    async def known(self, name: str) -> bool:
        """On the device already, or in the catalogue (a look at the disk, off the event loop)."""
        if name in self.residency.entries:
            return True
        try:
            return await asyncio.to_thread(self.catalogue.path, name) is not None
        except ConfinementError:
            return False

    async def tunes_non_experts(self, name: str) -> bool | None:
        """Whether the adapter tunes non-expert modules, known before it is loaded (None: unknown)."""
        entry = self.residency.entries.get(name)
        if entry is not None:
            return entry.variant
        return await asyncio.to_thread(self.catalogue.tunes_non_experts, name)

    async def acquire(self, name: str) -> Lease:
        """Leases the adapter for one request, once it is on the device. Raises AdapterNotFound,
        AdapterLoadFailed (the files were refused) or AdapterUnavailable."""
        metrics = self.front_end.metrics
        if self.residency.serving(name):
            metrics.hits[name] += 1
            self.residency.lease(name)
            return Lease(self.residency.entries[name], True, 0.0)
        metrics.misses[name] += 1
        use = self.residency.use(name)
        use.waiting += 1
        started = time.monotonic()
        try:
            while not self.residency.serving(name):
                remaining = started + self.wait_s - time.monotonic()
                if remaining <= 0:
                    raise AdapterUnavailable(f"adapter {name!r} could not be loaded within {self.wait_s:g} s: every "
                                             f"one of the {self.residency.max_resident} device-resident adapters has "
                                             "requests in flight; retry later")
                task = self._tasks.get(name)
                if task is None:
                    task = self._tasks[name] = asyncio.create_task(self._load_task(name))
                done, _ = await asyncio.wait({task}, timeout=remaining)
                if done and task.result() is not None:
                    error, not_found = task.result()
                    raise (AdapterNotFound if not_found else AdapterLoadFailed)(error)
        finally:
            use.waiting -= 1
            waited = time.monotonic() - started
            metrics.load_wait_seconds.observe(waited)
        self.residency.lease(name)
        return Lease(self.residency.entries[name], False, waited)

    def release(self, name: str) -> None:
        self.residency.release(name)
        self._changed.set()

    def changed(self) -> None:
        """An adapter left the device outside this object (an unload by hand): waiting loads look again."""
        self._changed.set()

    # -- loads --------------------------------------------------------------------------------
    async def _load_task(self, name: str) -> tuple[str, bool] | None:
        """Loads the adapter; None when loaded (or nobody waits for it any more), else (error, not found)."""
        try:
            return await self._load(name)
        finally:
            self._tasks.pop(name, None)

    async def _load(self, name: str) -> tuple[str, bool] | None:
        try:
            path = await asyncio.to_thread(self.catalogue.path, name)
        except ConfinementError as e:
            return str(e), True
        if path is None:
            return f"adapter {name!r} is not in the catalogue (it is gone from the adapter root)", True
        use = self.residency.use(name)
        while use.waiting:
            if self.residency.serving(name):  # loaded by hand meanwhile, or its eviction was called off
                return None
            if name in self.residency.states:  # on its way out: load it again once it is gone
                await self._wait_change()
                continue
            room, victim = await self._take_room(name)
            if not room:
                await self._prefetch(name, str(path))
                await self._wait_change()
                continue
            entry, answers = None, None
            evicting = [victim] if victim is not None else []  # until the load's start evicts it
            try:
                answers = await self._run_load(name, str(path), evicting)
                outcome = None if answers is None else agreement.check_load(name, answers)
                if outcome is not None and outcome.roll_back:
                    await self.front_end.engine.collective_rpc("expertweave_discard_adapter", args=(name,))
                if outcome is not None and outcome.error is None:
                    entry = AdapterEntry(str(path), outcome.info["sha256"], outcome.info["variant"])
            finally:
                self.residency.end_load(name, entry)  # first: a victim that stays needs this row back
                self._changed.set()
                for still in evicting:  # its last requests are finishing, or the start failed
                    async with self._room_lock:  # still evicting: no request may lease it meanwhile
                        await self._finish_eviction(still)
            if answers is None:  # the victim still had a request finishing: evicted the slow way, then again
                continue
            if entry is not None:
                self._loaded(name, str(path), outcome.info, answers[0])
                return None
            if not all(a.get("capacity") for a in answers if "error" in a):
                logger.info("ExpertWeave: adapter %r not loaded: %s", name, outcome.error)
                return self.front_end.public(outcome.public_error or outcome.error), False
            async with self._room_lock:  # no slots or bytes for it: make some
                victim = self.residency.victim()
                if victim is not None:
                    await self._evict(victim)
            if victim is None:
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

    async def reserve_row(self, name: str) -> str | None:
        """Takes a row and the name for a load by hand, evicting idle catalogue adapters while no row is free;
        None, or why it cannot (the name is taken, or every resident adapter is pinned or in use)."""
        async with self._room_lock:
            while not self.residency.has_free_row():
                victim = self.residency.victim()
                if victim is None:
                    return (f"all {self.residency.max_resident} adapter rows hold adapters loaded by hand or in "
                            "use (--max-adapters): unload one first")
                await self._evict(victim)
                if victim in self.residency.states:
                    return f"adapter {victim!r} would have made room but still has requests: retry later"
            if name in self.residency.states:
                return f"adapter name {name!r} is already in use"
            self.residency.begin_load(name)
            return None

    async def _wait_change(self) -> None:
        """Until a lease ends or an adapter leaves the device (at most half a second)."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), 0.5)
        except asyncio.TimeoutError:
            pass

    async def _run_load(self, name: str, path: str, evicting: list[str]) -> list[dict] | None:
        """Every rank's load answer; None when the victim (evicting's one name, if any) could not be evicted
        at once (the caller then evicts it by polling, and the load must take its room again). The victim
        leaves `evicting` once gone."""
        engine = self.front_end.engine
        victim = evicting[0] if evicting else None
        with self.front_end.metrics.timed(self.front_end.metrics.load_seconds):
            # The eviction travels with the start: one step-gap round trip instead of two.
            live = lifetime.live_request_ids(engine) if victim is not None else []
            started = await engine.collective_rpc("expertweave_start_load", args=(name, path, victim, live))
            if victim is not None:
                evicted = [s.get("evicted", False) for s in started]
                if any(evicted) and not all(evicted):
                    raise ExpertWeaveError(f"adapter {victim!r}: the tensor-parallel ranks disagree on whether "
                                           "it is idle; the engine's ranks no longer hold the same adapters")
                if not all(evicted):
                    return None
                self._evicted(victim)
                evicting.clear()
            if any("error" in s for s in started):
                return started
            future = self._waiting_for[name] = asyncio.get_running_loop().create_future()
            if self._collector is None or self._collector.done():
                self._collector = asyncio.create_task(self._collect())
            return await future

    async def _collect(self) -> None:
        """Collects finished loads from every rank while some load is outstanding."""
        engine = self.front_end.engine
        while self._waiting_for:
            try:
                ranks = await engine.collective_rpc("expertweave_collect_loads")
            except Exception as e:  # the engine is gone: every load waiting on it fails with the cause
                for future in self._waiting_for.values():
                    if not future.done():
                        future.set_exception(e)
                self._waiting_for.clear()
                return
            for rank, answer in enumerate(ranks):
                for name, result in answer["done"].items():
                    self._answers.setdefault(name, {})[rank] = result
            for name in [n for n, got in self._answers.items() if len(got) == len(ranks)]:
                got = self._answers.pop(name)
                future = self._waiting_for.pop(name, None)
                if future is not None and not future.done():
                    future.set_result([got[r] for r in range(len(ranks))])
            await asyncio.sleep(COLLECT_S)

    def _loaded(self, name: str, path: str, info: dict, answer: dict) -> None:
        source = answer.get("source")
        self._prefetched.discard(name)
        nbytes = info["bytes"]
        self._mean_packed_bytes = nbytes if self._mean_packed_bytes is None else \
            0.8 * self._mean_packed_bytes + 0.2 * nbytes
        metrics = self.front_end.metrics
        metrics.loads[name] += 1
        metrics.loads_by_source.labels(source or "disk").inc()
        logger.info("ExpertWeave: loaded adapter %r on demand from %s (%s, read %.3f s, copy %.3f s)", name, path,
                    source, answer.get("read_s", 0.0), answer.get("copy_s", 0.0))

    async def _evict(self, name: str) -> None:
        """Unloads an idle adapter; under the room lock, so no load of it starts before it is gone."""
        if self.residency.begin_leave(name, EVICTING):  # its requests wait for a reload (admission refuses it)
            await self._finish_eviction(name)

    async def _finish_eviction(self, name: str) -> None:
        """Waits for the evicting adapter's last requests, then takes it off the device; if it cannot go (a
        request reached the engine without a lease, or the engine refused), it stays and is served again."""
        try:
            await lifetime.unload_when_idle_async(self.front_end.engine, name, EVICT_TIMEOUT_S)
        except Exception as e:  # AdapterBusyError, or the workers' own refusal
            self.residency.end_leave(name, left=False)
            self._changed.set()
            logger.warning("ExpertWeave: adapter %r not evicted: %s", name, lifetime.worker_message(e))
            return
        self._evicted(name)

    def _evicted(self, name: str) -> None:
        self._changed.set()
        self.residency.end_leave(name, left=True)
        self.front_end.metrics.evictions.inc()
        self.front_end.metrics.forget(name)
        logger.info("ExpertWeave: evicted adapter %r (%s policy)", name, self.residency.policy)

    # -- prefetch -----------------------------------------------------------------------------
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
        waiting = [n for n in self._tasks if n not in self.residency.entries]  # tasks start in arrival order
        if name not in waiting[:self.horizon()]:
            return
        self._prefetched.add(name)
        await self.front_end.engine.collective_rpc("expertweave_prefetch", args=(name, path))

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

        await self.front_end.engine.collective_rpc("expertweave_warm_host_tier", args=(await asyncio.to_thread(entries),))

    # -- listing ------------------------------------------------------------------------------
    async def states(self) -> dict[str, str]:
        """Every catalogued or loaded adapter's tier: device, loading, host or disk."""
        tiers = (await self.front_end.engine.collective_rpc("expertweave_tiers"))[0]
        names = set(await asyncio.to_thread(self.catalogue.names)) | set(self.residency.entries)
        host = set(tiers["host"])
        loading = set(tiers["loading"]) | self.residency.loading
        return {n: "device" if n in self.residency.entries else "loading" if n in loading
                else "host" if n in host else "disk" for n in sorted(names)}
