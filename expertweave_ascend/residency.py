"""Which adapters a front-end keeps on the device: leases, the eviction policies, the choice of victim.

A front-end leases an adapter for each request it admits and gives the lease back when the request's
response ends, so an adapter with a lease has requests in flight or queued in the engine and is never
evicted (I2). When a load needs room, the policy picks among the adapters that are resident, idle (no
lease, nobody waiting for them), not pinned (loaded by hand) and not already on their way out:
  lru     the least recently used;
  demand  the least demanded: its requests counted with a half-life of DEMAND_HALF_LIFE_S (fMoE's
          probability-aware eviction applied to whole adapters); ties go to the least recent.
No I/O here: the server's TieredAdapters (integrations/vllm/tiering.py) does the loads and evictions.
"""

import math
import time
from dataclasses import dataclass

POLICIES = ("lru", "demand")
LOADING, RESIDENT, EVICTING, UNLOADING = "loading", "resident", "evicting", "unloading"
DEMAND_HALF_LIFE_S = 30.0


@dataclass
class AdapterUse:
    leases: int = 0  # requests admitted and not finished
    waiting: int = 0  # requests waiting for the adapter to be loaded
    last_used: float = 0.0
    demand: float = 0.0  # decayed request count, as of last_used
    pinned: bool = False  # loaded by hand: only an unload takes it off the device

    def decayed_demand(self, now: float) -> float:
        return self.demand * math.exp2(-(now - self.last_used) / DEMAND_HALF_LIFE_S)


class Residency:
    """Which adapters are on the device and where each is in its life, written only through the
    transitions below (a transition asked of an adapter in another state raises, as a bug would):

        (absent) --begin_load--> LOADING --end_load(ok)--> RESIDENT --begin_leave--> EVICTING | UNLOADING
           ^                        |                        ^                              |
           +------ end_load(fail) --+                        +------ end_leave(stayed) -----+
           +<------------------------------------------------------ end_leave(left) --------+

    add_resident puts an adapter loaded outside the catalogue's loads (at start, by hand) straight in
    RESIDENT. Each resident adapter carries its entry (what the front-end knows of it: path, hash, kind),
    the one copy every other view reads. Only a RESIDENT adapter is served (leased); an adapter leaves
    by one way at a time, so an unload and an eviction never race over one adapter."""

    def __init__(self, max_resident: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.max_resident = max_resident
        self.policy = policy
        self.uses: dict[str, AdapterUse] = {}
        self.states: dict[str, str] = {}  # name -> LOADING, RESIDENT, EVICTING or UNLOADING
        self.entries: dict[str, object] = {}  # name -> its entry, for every adapter on the device

    def use(self, name: str) -> AdapterUse:
        return self.uses.setdefault(name, AdapterUse())

    def _in(self, *states: str) -> set[str]:
        return {name for name, state in self.states.items() if state in states}

    @property
    def loading(self) -> set[str]:
        return self._in(LOADING)

    def _move(self, name: str, expected: tuple[str | None, ...], state: str | None) -> None:
        if self.states.get(name) not in expected:
            raise RuntimeError(f"adapter {name!r} is {self.states.get(name) or 'absent'}, not "
                               f"{' or '.join(s or 'absent' for s in expected)}")
        if state is None:
            del self.states[name]
        else:
            self.states[name] = state

    def begin_load(self, name: str) -> None:
        self._move(name, (None,), LOADING)

    def end_load(self, name: str, entry: object | None) -> None:
        """The load's end: its entry (RESIDENT), or None when it failed (absent again)."""
        self._move(name, (LOADING,), None if entry is None else RESIDENT)
        if entry is not None:
            self.entries[name] = entry

    def add_resident(self, name: str, entry: object, pinned: bool = False) -> None:
        self._move(name, (None,), RESIDENT)
        self.entries[name] = entry
        self.use(name).pinned = pinned

    def begin_leave(self, name: str, how: str) -> bool:
        """Starts an eviction (EVICTING) or an unload (UNLOADING); False when the adapter is not served now."""
        if self.states.get(name) != RESIDENT:
            return False
        self.states[name] = how
        return True

    def end_leave(self, name: str, left: bool) -> None:
        """The eviction's or unload's end: off the device (absent), or still served when it could not leave;
        an adapter stays only in a free row (a load given its row must end first)."""
        if not left and self.states.get(name) == EVICTING and not self.has_room():
            raise RuntimeError(f"adapter {name!r} cannot stay on the device: its row went to a load still running")
        self._move(name, (EVICTING, UNLOADING), None if left else RESIDENT)
        if left:
            del self.entries[name]
            self.use(name).pinned = False

    def lease(self, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        use = self.use(name)
        use.demand = use.decayed_demand(now) + 1
        use.last_used = now
        use.leases += 1

    def release(self, name: str) -> None:
        self.uses[name].leases -= 1

    def serving(self, name: str) -> bool:
        """Resident and not on its way out: a request may lease it now."""
        return self.states.get(name) == RESIDENT

    def admits(self, name: str) -> bool:
        """Whether the engine may take a request for the adapter now: it is served, or it is being unloaded
        and requests leased before the unload began are still on their way in (the unload waits for them)."""
        state = self.states.get(name)
        return state == RESIDENT or (state == UNLOADING and self.use(name).leases > 0)

    def has_room(self) -> bool:
        """A device row is free for one more load (an adapter being evicted counts as gone: its eviction
        travels with the load's start; one being unloaded by hand holds its row until the unload ends)."""
        return len(self._in(RESIDENT, LOADING, UNLOADING)) < self.max_resident

    def has_free_row(self) -> bool:
        """A device row is free now, an eviction's included (a load by hand takes no part in evictions)."""
        return len(self.states) < self.max_resident

    def evictable(self) -> list[str]:
        return [n for n in self._in(RESIDENT) if not (u := self.use(n)).leases and not u.waiting and not u.pinned]

    def victim(self, now: float | None = None) -> str | None:
        """The adapter the policy evicts first, or None when every resident adapter is in use."""
        now = time.monotonic() if now is None else now
        candidates = self.evictable()
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda n: (self.uses[n].last_used, n))
        return min(candidates, key=lambda n: (self.uses[n].decayed_demand(now), self.uses[n].last_used, n))
