"""Which adapters a front-end keeps on the device: one table, its transitions, leases and the eviction policies.

The table holds one entry per adapter the front-end has met: where it is in its life (state), what a load put
on the device (its content: path, hash, kind), whether it was loaded by hand (pinned), and its use (leases,
waiters, recency, demand). Every other view (the adapters on the device, the ones loading, a listing) is
derived from the table; nothing else records them.

A front-end leases an adapter for each request it admits and gives the lease back when the request's
response ends, so an adapter with a lease has requests in flight or queued in the engine and is never
evicted (I2). When a load needs room, the policy picks among the adapters that are resident, idle (no
lease, nobody waiting for them), not pinned and not already on their way out:
  lru     the least recently used;
  demand  the least demanded: its requests counted with a half-life of DEMAND_HALF_LIFE_S (fMoE's
          probability-aware eviction applied to whole adapters); ties go to the least recent.
No I/O here: the front-end (integrations/vllm/frontend.py) does the loads and evictions.
"""

import math
import time
from dataclasses import dataclass

POLICIES = ("lru", "demand")
LOADING, RESIDENT, EVICTING, UNLOADING = "loading", "resident", "evicting", "unloading"
ON_DEVICE = (RESIDENT, EVICTING, UNLOADING)  # a load put it there, and it has not left yet
DEMAND_HALF_LIFE_S = 30.0


@dataclass(frozen=True)
class Content:
    """What a load put on the device: the adapter's files, their content hash and its kind."""
    path: str
    sha256: str
    variant: bool = False  # it tunes non-expert modules: its requests carry VARIANT_ARG (grouping.py)


@dataclass
class Entry:
    state: str | None = None  # LOADING, RESIDENT, EVICTING, UNLOADING; None: not on the device
    content: Content | None = None  # set exactly while the adapter is on the device (ON_DEVICE)
    pinned: bool = False  # loaded by hand: only an unload takes it off the device
    leases: int = 0  # requests admitted and not finished
    waiting: int = 0  # requests waiting for the adapter to be loaded
    last_used: float = 0.0
    demand: float = 0.0  # decayed request count, as of last_used

    def decayed_demand(self, now: float) -> float:
        return self.demand * math.exp2(-(now - self.last_used) / DEMAND_HALF_LIFE_S)


class Residency:
    """The table, written only through the transitions below (a transition asked of an adapter in another
    state raises, as a bug would):

        (absent) --begin_load--> LOADING --end_load(ok)--> RESIDENT --begin_leave--> EVICTING | UNLOADING
           ^                        |                        ^                              |
           +------ end_load(fail) --+                        +------ end_leave(stayed) -----+
           +<------------------------------------------------------ end_leave(left) --------+

    add_resident puts an adapter loaded outside the front-end's loads (at the engine's start) straight in
    RESIDENT. Only a RESIDENT adapter is served (leased); an adapter leaves by one way at a time, so an
    unload and an eviction never race over one adapter."""

    def __init__(self, max_resident: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.max_resident = max_resident
        self.policy = policy
        self.table: dict[str, Entry] = {}

    # -- views ----------------------------------------------------------------------------------
    def use(self, name: str) -> Entry:
        """The adapter's entry, made (absent, unused) for a name met the first time."""
        return self.table.setdefault(name, Entry())

    def state(self, name: str) -> str | None:
        entry = self.table.get(name)
        return None if entry is None else entry.state

    def content(self, name: str) -> Content | None:
        entry = self.table.get(name)
        return None if entry is None else entry.content

    @property
    def states(self) -> dict[str, str]:
        return {name: e.state for name, e in self.table.items() if e.state is not None}

    @property
    def entries(self) -> dict[str, Content]:
        """The adapters on the device and their content."""
        return {name: e.content for name, e in self.table.items() if e.state in ON_DEVICE}

    def _in(self, *states: str) -> list[str]:
        return [name for name, e in self.table.items() if e.state in states]

    @property
    def loading(self) -> set[str]:
        return set(self._in(LOADING))

    # -- transitions ----------------------------------------------------------------------------
    def _move(self, name: str, expected: tuple[str | None, ...], state: str | None) -> Entry:
        entry = self.use(name)
        if entry.state not in expected:
            raise RuntimeError(f"adapter {name!r} is {entry.state or 'absent'}, not "
                               f"{' or '.join(s or 'absent' for s in expected)}")
        entry.state = state
        return entry

    def begin_load(self, name: str) -> None:
        self._move(name, (None,), LOADING)

    def end_load(self, name: str, content: Content | None, pinned: bool = False) -> None:
        """The load's end: what it put on the device (RESIDENT), or None when it failed (absent again)."""
        entry = self._move(name, (LOADING,), None if content is None else RESIDENT)
        entry.content = content
        entry.pinned = pinned and content is not None

    def add_resident(self, name: str, content: Content) -> None:
        entry = self._move(name, (None,), RESIDENT)
        entry.content = content

    def begin_leave(self, name: str, how: str) -> bool:
        """Starts an eviction (EVICTING) or an unload (UNLOADING); False when the adapter is not served now."""
        if self.state(name) != RESIDENT:
            return False
        self.table[name].state = how
        return True

    def end_leave(self, name: str, left: bool) -> None:
        """The eviction's or unload's end: off the device (absent), or still served when it could not leave;
        an adapter stays only in a free row (a load given its row must end first)."""
        if not left and self.state(name) == EVICTING and not self.has_room():
            raise RuntimeError(f"adapter {name!r} cannot stay on the device: its row went to a load still running")
        entry = self._move(name, (EVICTING, UNLOADING), None if left else RESIDENT)
        if left:
            entry.content = None
            entry.pinned = False

    # -- use ------------------------------------------------------------------------------------
    def lease(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        entry = self.use(name)
        entry.demand = entry.decayed_demand(now) + 1
        entry.last_used = now
        entry.leases += 1

    def release(self, name: str) -> None:
        self.table[name].leases -= 1

    def serving(self, name: str) -> bool:
        """Resident and not on its way out: a request may lease it now."""
        return self.state(name) == RESIDENT

    def admits(self, name: str) -> bool:
        """Whether the engine may take a request for the adapter now: it is served, or it is being unloaded
        and requests leased before the unload began are still on their way in (the unload waits for them)."""
        state = self.state(name)
        return state == RESIDENT or (state == UNLOADING and self.table[name].leases > 0)

    def pinned(self) -> list[str]:
        return [name for name, e in self.table.items() if e.state in ON_DEVICE and e.pinned]

    def has_room(self) -> bool:
        """A device row is free for one more load (an adapter being evicted counts as gone: its eviction
        travels with the load's start; one being unloaded by hand holds its row until the unload ends)."""
        return len(self._in(RESIDENT, LOADING, UNLOADING)) < self.max_resident

    def has_free_row(self) -> bool:
        """A device row is free now, an eviction's included (a load by hand takes no part in evictions)."""
        return len(self._in(LOADING, *ON_DEVICE)) < self.max_resident

    def evictable(self) -> list[str]:
        return [n for n in self._in(RESIDENT) if not (e := self.table[n]).leases and not e.waiting and not e.pinned]

    def victim(self, now: float | None = None) -> str | None:
        """The adapter the policy evicts first, or None when every resident adapter is in use."""
        now = time.monotonic() if now is None else now
        candidates = self.evictable()
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda n: (self.table[n].last_used, n))
        return min(candidates, key=lambda n: (self.table[n].decayed_demand(now), self.table[n].last_used, n))
