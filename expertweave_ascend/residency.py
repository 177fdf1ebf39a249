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
    def __init__(self, max_resident: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"eviction policy {policy!r}: expected one of {', '.join(POLICIES)}")
        self.max_resident = max_resident
        self.policy = policy
        self.uses: dict[str, AdapterUse] = {}
        self.resident: set[str] = set()
        self.loading: set[str] = set()
        self.evicting: set[str] = set()

    def use(self, name: str) -> AdapterUse:
        return self.uses.setdefault(name, AdapterUse())

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
        return name in self.resident and name not in self.evicting

    def has_room(self) -> bool:
        """A device row is free for one more load (adapters on their way out count as gone)."""
        return len((self.resident - self.evicting) | self.loading) < self.max_resident

    def evictable(self) -> list[str]:
        return [n for n in self.resident - self.evicting - self.loading
                if not (u := self.use(n)).leases and not u.waiting and not u.pinned]

    def victim(self, now: float | None = None) -> str | None:
        """The adapter the policy evicts first, or None when every resident adapter is in use."""
        now = time.monotonic() if now is None else now
        candidates = self.evictable()
        if not candidates:
            return None
        if self.policy == "lru":
            return min(candidates, key=lambda n: (self.uses[n].last_used, n))
        return min(candidates, key=lambda n: (self.uses[n].decayed_demand(now), self.uses[n].last_used, n))
