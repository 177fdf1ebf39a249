"""`expertweave_*` series on vLLM's /metrics, per adapter on the device (the base under its served name).

The workers count, from each step's scheduler output, the requests that start and the tokens sampled for
each adapter (a request samples a token in a step once that step computes its whole sequence so far);
the front-end counts loads, hits and misses, unloads and evictions, and times loads. The workers'
figures are fetched by one engine call every REFRESH_S seconds (the server's refresh task), never per
scrape, so scrapes cost the engine nothing however often they come. Per-adapter series exist for the
adapters on the device only: an adapter's series go when it leaves, so the label sets stay bounded by
max_adapters however many adapters a catalogue serves over time.
vLLM serves /metrics from prometheus_client's default registry with one API server process (with
several, vLLM switches to multiprocess collection and these series are not included).
"""

import time
from collections import Counter as Tally
from contextlib import contextmanager
from typing import Callable, Collection

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

REFRESH_S = 1.0


class AdapterMetrics:
    """The front-end's series, and the collector rendering the per-adapter, workers' and memory figures."""

    def __init__(self, on_device: Callable[[], Collection[str]], registry=REGISTRY):
        self.on_device = on_device  # the front-end's view of the adapters on the device now
        self.unloads = Counter("expertweave_adapter_unloads", "ESFT adapter unloads", registry=registry)
        self.evictions = Counter("expertweave_adapter_evictions", "Adapters taken off the device for room",
                                 registry=registry)
        self.load_seconds = Histogram("expertweave_adapter_load_seconds", "Time to load an ESFT adapter, all ranks",
                                      registry=registry)
        self.unload_seconds = Histogram("expertweave_adapter_unload_seconds",
                                        "Time to unload an ESFT adapter, waiting for its requests included",
                                        registry=registry)
        self.load_wait_seconds = Histogram("expertweave_adapter_load_wait_seconds",
                                           "Time a request waited for its adapter to be loaded (misses)",
                                           registry=registry)
        self.loads_by_source = Counter("expertweave_adapter_loads_by_source",
                                       "On-demand loads by where the packed adapter came from: disk, host (the host "
                                       "tier) or prefetch (the host tier, put there by a prefetch)", ["source"],
                                       registry=registry)
        self.loads: Tally[str] = Tally()  # per adapter, while it is on the device
        self.hits: Tally[str] = Tally()
        self.misses: Tally[str] = Tally()
        self.tier_bytes: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.generated: dict[str, int] = {}
        self.resident: dict[str, int] = {}
        self.switches = (0, 0.0)  # non-expert weight switches between steps, and their seconds
        self.base_name = ""
        registry.register(self)

    def forget(self, name: str) -> None:
        """Drops the front-end's counts of an adapter that left the device."""
        for tally in (self.loads, self.hits, self.misses):
            tally.pop(name, None)

    @contextmanager
    def timed(self, histogram: Histogram):
        start = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - start)

    def update(self, figures: dict, base_name: str) -> None:
        """figures: a worker's expertweave_metrics() answer."""
        served, memory, tiers = figures["served"], figures["memory"], figures["tiers"]
        self.base_name = base_name

        def named(counts: dict) -> dict[str, int]:
            return {name or base_name: count for name, count in counts.items()}

        self.requests = named(served["requests"])
        self.generated = named(served["generated_tokens"])
        self.resident = {name: adapter["bytes"] for name, adapter in memory["adapters"].items()}
        device = memory.get("adapter_slot_bytes")
        device = sum(self.resident.values()) if device is None else device
        self.tier_bytes = {"device": device + memory.get("shared_expert_bytes", 0), "host": tiers["host_bytes"],
                           "warm": tiers["warm_bytes"]}
        self.switches = (served["variant_switches"], served["variant_switch_seconds"])

    def collect(self):
        requests = CounterMetricFamily("expertweave_requests", "Requests started, by adapter", labels=["adapter"])
        tokens = CounterMetricFamily("expertweave_generated_tokens", "Tokens generated, by adapter", labels=["adapter"])
        resident = GaugeMetricFamily("expertweave_adapter_resident_bytes", "Bytes of a loaded adapter's experts",
                                     labels=["adapter"])
        loads = CounterMetricFamily("expertweave_adapter_loads", "ESFT adapter loads that succeeded",
                                    labels=["adapter"])
        hits = CounterMetricFamily("expertweave_adapter_hits", "Requests whose adapter was on the device",
                                   labels=["adapter"])
        misses = CounterMetricFamily("expertweave_adapter_misses", "Requests whose adapter had to be loaded first",
                                     labels=["adapter"])
        shown = set(self.on_device()) | {self.base_name}
        for family, counts in ((requests, self.requests), (tokens, self.generated), (resident, self.resident),
                               (loads, self.loads), (hits, self.hits), (misses, self.misses)):
            for name, count in counts.items():
                if name in shown:
                    family.add_metric([name], count)
        tiers = GaugeMetricFamily("expertweave_tier_bytes", "Bytes of adapters held per tier: device (experts "
                                  "in slots, each once, and tuned shared experts), host (packed in the host tier), "
                                  "warm (freed granules kept mapped)",
                                  labels=["tier"])
        for tier, nbytes in self.tier_bytes.items():
            tiers.add_metric([tier], nbytes)
        switches = CounterMetricFamily("expertweave_variant_switches", "Switches of the model's non-expert weights "
                                       "between steps, for adapters that tune non-expert modules",
                                       value=self.switches[0])
        switch_seconds = CounterMetricFamily("expertweave_variant_switch_seconds", "Time those switches took",
                                             value=self.switches[1])
        yield from (requests, tokens, resident, loads, hits, misses, tiers, switches, switch_seconds)

    def describe(self):
        return []
