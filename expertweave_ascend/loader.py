"""Adapter loads off the engine's thread: reading, checking and packing the files (or taking the packed
copy the host tier holds) and copying the experts into their slots run on a loader thread; the engine's
thread publishes each finished load between steps (collect), so a table row is written only after every
slot it points at is written (I1) and never while a step could be reading the tables' shape of things.

Prefetch packs an adapter into the host tier on a thread of its own, so a load that follows finds it
there; a load of an adapter being prefetched waits for that packing instead of reading the files twice.
Warming fills the host tier's free room from a list of adapters (a server's catalogue) on that thread.
"""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import AdapterStateError, CapacityError, ExpertWeaveError
from .host_tier import HostTier
from .packed import PackedAdapter
from .weave import ExpertWeave, PendingLoad


class BackgroundLoader:
    def __init__(self, weave: ExpertWeave, host_tier: HostTier):
        self.weave = weave
        self.host_tier = host_tier
        # Both threads map device memory and copy into it: each gets the device first.
        self._loads = ThreadPoolExecutor(1, thread_name_prefix="expertweave-load",
                                         initializer=weave.backend.bind_thread)
        self._prefetches = ThreadPoolExecutor(1, thread_name_prefix="expertweave-prefetch",
                                              initializer=weave.backend.bind_thread)
        self._lock = threading.Lock()
        self._running: dict[str, Future] = {}  # name -> future of (PendingLoad, facts about the load)
        self._packing: dict[str, Future] = {}  # name -> future of a prefetch's PackedAdapter
        self.prefetched: set[str] = set()  # in the host tier because a prefetch put it there, not yet loaded

    def start(self, name: str, path: str | Path) -> None:
        """Starts loading; AdapterStateError if the name is loaded or loading already."""
        with self._lock:
            if name in self._running:
                raise AdapterStateError(f"adapter {name!r} is already being loaded")
            if name in self.weave.adapters:
                raise AdapterStateError(f"adapter {name!r} is already loaded")
            self._running[name] = self._loads.submit(self._load, name, str(path))

    def prefetch(self, name: str, path: str | Path) -> bool:
        """Packs the adapter into the host tier in the background, unless it is there, loaded or on its way."""
        with self._lock:
            if (name in self._packing or name in self._running or name in self.weave.adapters
                    or self.host_tier.get(name, path) is not None or self.host_tier.budget_bytes <= 0):
                return False
            self._packing[name] = self._prefetches.submit(self._prefetch, name, str(path))
            return True

    def warm(self, entries: list[tuple[str, str]]) -> None:
        """Packs these adapters into the host tier in the background, in order, while they fit in its free
        room (nothing already there is dropped for them); an adapter whose files are refused is skipped."""
        if self.host_tier.budget_bytes > 0:
            self._prefetches.submit(self._warm, list(entries))

    def _warm(self, entries: list[tuple[str, str]]) -> None:
        for name, path in entries:
            if name in self.weave.adapters or self.host_tier.get(name, path) is not None:
                continue
            try:
                packed = self.weave.pack(path)
            except ExpertWeaveError:
                continue  # a request for it gets the error when it is loaded
            if not self.host_tier.put(name, packed, make_room=False):
                return

    def load_now(self, name: str, path: str | Path):
        """Loads on the caller's thread (through the host tier, as background loads do); the LoadedAdapter
        and the load's source and timing."""
        pending, facts = self._load(name, str(path))
        loaded = self.weave.publish(pending)
        self.prefetched.discard(name)
        return loaded, facts

    def loading(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def collect(self) -> dict[str, dict]:
        """Publishes every finished load (call from the engine's thread, between steps): name -> its row,
        slots, content hash and timing, or {"error": ...}."""
        with self._lock:
            done = {name: f for name, f in self._running.items() if f.done()}
            for name in done:
                del self._running[name]
            for name in [n for n, f in self._packing.items() if f.done()]:
                del self._packing[name]
        results = {}
        for name, future in done.items():
            try:
                pending, facts = future.result()
            except ExpertWeaveError as e:
                results[name] = {"error": str(e), "public_error": getattr(e, "public_message", str(e)),
                                 "capacity": isinstance(e, CapacityError)}
                continue
            except Exception as e:  # an unexpected failure in the loader thread must not stop the engine
                results[name] = {"error": f"adapter {name!r}: load failed: {type(e).__name__}: {e}"}
                continue
            loaded = self.weave.publish(pending)
            self.prefetched.discard(name)
            results[name] = {"row": loaded.row, "experts": loaded.num_experts, "bytes": loaded.nbytes,
                             "sha256": loaded.sha256, "slots": {str(l): s for l, s in loaded.slots.items()},
                             "variant": bool(loaded.non_expert), **facts}
        return results

    def wait(self, names: set[str], poll_s: float = 0.005) -> dict[str, dict]:
        """Collects until every named load has finished; raises the first failure as ExpertWeaveError."""
        done: dict[str, dict] = {}
        while not names <= set(done):
            done.update(self.collect())
            time.sleep(poll_s)
        failed = [answer["error"] for name, answer in done.items() if "error" in answer]
        if failed:
            raise ExpertWeaveError(failed[0])
        return done

    def _packed(self, name: str, path: str) -> tuple[PackedAdapter, str]:
        # A prefetch on its way is waited for first: once collect() has forgotten it, its copy is in the tier.
        with self._lock:
            packing = self._packing.get(name)
        if packing is not None:
            try:
                packing.result()
            except ExpertWeaveError:
                pass  # read it here and report the error as the load's own
        packed = self.host_tier.get(name, path)
        if packed is not None:  # a prefetch's copy counts as one until a load of it is published
            return packed, "prefetch" if name in self.prefetched else "host"
        packed = self.weave.pack(path)
        self.host_tier.put(name, packed)
        return packed, "disk"

    def _load(self, name: str, path: str) -> tuple[PendingLoad, dict]:
        self.weave.check_new_name(name)
        start = time.perf_counter()
        packed, source = self._packed(name, path)
        packed_at = time.perf_counter()
        pending = self.weave.prepare(name, packed)
        return pending, {"source": source, "read_s": packed_at - start, "copy_s": time.perf_counter() - packed_at}

    def _prefetch(self, name: str, path: str) -> None:
        packed = self.weave.pack(path)
        self.prefetched.add(name)  # before the copy is visible: a load that finds it there counts it as prefetched
        if not self.host_tier.put(name, packed):
            self.prefetched.discard(name)

    def close(self) -> None:
        """Waits for the loader threads and gives back every load not published."""
        self._prefetches.shutdown(wait=True, cancel_futures=True)
        self._loads.shutdown(wait=True, cancel_futures=True)
        for future in self._running.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                self.weave.abandon(future.result()[0])
        self._running.clear()
