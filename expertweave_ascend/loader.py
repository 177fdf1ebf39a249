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
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterStateError, CapacityError, ExpertWeaveError
from .host_tier import HostTier
from .packed import PackedAdapter
from .weave import ExpertWeave, LoadedAdapter, PendingLoad


@dataclass(frozen=True)
class LoadAnswer:
    """One rank's outcome of a load: where it put the adapter (row, slots per MoE layer), its size, content
    hash and kind, where the packed copy came from and how long reading and copying took (one pass, all of it
    read_s, where no host tier keeps a packed copy); or the one-line error it met (public_error: the same
    without anything read from the files; capacity: no room)."""
    row: int = -1
    experts: int = 0
    bytes: int = 0
    sha256: str = ""
    slots: dict[str, list[int]] = field(default_factory=dict)
    variant: bool = False
    source: str | None = None  # disk, host or prefetch
    read_s: float = 0.0
    copy_s: float = 0.0
    error: str | None = None
    public_error: str | None = None
    capacity: bool = False

    @classmethod
    def loaded(cls, loaded: LoadedAdapter, facts: dict) -> "LoadAnswer":
        return cls(loaded.row, loaded.num_experts, loaded.nbytes, loaded.sha256,
                   {str(layer): list(slots) for layer, slots in loaded.slots.items()}, bool(loaded.non_expert),
                   **facts)

    def summary(self) -> dict:
        """What a load by hand reports to its caller: row, experts, bytes, content hash and kind."""
        return {"row": self.row, "experts": self.experts, "bytes": self.bytes, "sha256": self.sha256,
                "variant": self.variant}

    @classmethod
    def failed(cls, error: ExpertWeaveError) -> "LoadAnswer":
        return cls(error=str(error), public_error=getattr(error, "public_message", str(error)),
                   capacity=isinstance(error, CapacityError))


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

    def load_now(self, name: str, path: str | Path) -> LoadAnswer:
        """Loads on the caller's thread (through the host tier, as background loads do)."""
        try:
            pending, facts = self._load(name, str(path))
        except ExpertWeaveError as e:
            return LoadAnswer.failed(e)
        loaded = self.weave.publish(pending)
        self.prefetched.discard(name)
        return LoadAnswer.loaded(loaded, facts)

    def loading(self) -> list[str]:
        with self._lock:
            return list(self._running)

    def collect(self) -> dict[str, LoadAnswer]:
        """Publishes every finished load (call from the engine's thread, between steps): name -> its answer."""
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
            except Exception as e:  # an unexpected failure in the loader thread must not stop the engine either
                results[name] = LoadAnswer.failed(e if isinstance(e, ExpertWeaveError) else
                                                  ExpertWeaveError(f"adapter {name!r}: load failed: "
                                                                   f"{type(e).__name__}: {e}"))
                continue
            loaded = self.weave.publish(pending)
            self.prefetched.discard(name)
            results[name] = LoadAnswer.loaded(loaded, facts)
        return results

    def wait(self, names: set[str], poll_s: float = 0.005) -> dict[str, LoadAnswer]:
        """Collects until every named load has finished; raises the first failure as ExpertWeaveError."""
        done: dict[str, LoadAnswer] = {}
        while not names <= set(done):
            done.update(self.collect())
            time.sleep(poll_s)
        failed = [answer.error for answer in done.values() if answer.error is not None]
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
        if self.host_tier.budget_bytes < self.weave.packed_nbytes(path):  # the tier could not keep a copy
            pending = self.weave.prepare_from_files(name, path)
            return pending, {"source": "disk", "read_s": time.perf_counter() - start, "copy_s": 0.0}
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
