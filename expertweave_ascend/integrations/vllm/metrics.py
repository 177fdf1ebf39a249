"""`expertweave_*` series on vLLM's /metrics, per adapter (the base under its served name).

The workers count, from each step's scheduler output, the requests that start and the tokens sampled for
each adapter (a request samples a token in a step once that step computes its whole sequence so far);
the front-end counts loads and unloads and times them. Worker counts and resident bytes are fetched when
/metrics is read (AdapterModelMiddleware awaits refresh first), so a scrape sees current figures.
vLLM serves /metrics from prometheus_client's default registry with one API server process (with
several, vLLM switches to multiprocess collection and these series are not included).
"""

import time
from contextlib import contextmanager

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class AdapterMetrics:
    """The front-end's series, and the collector rendering the workers' and memory figures."""

    def __init__(self, registry=REGISTRY):
        self.loads = Counter("expertweave_adapter_loads", "ESFT adapter loads that succeeded", ["adapter"],
                             registry=registry)
        self.unloads = Counter("expertweave_adapter_unloads", "ESFT adapter unloads", ["adapter"], registry=registry)
        self.load_seconds = Histogram("expertweave_adapter_load_seconds", "Time to load an ESFT adapter, all ranks",
                                      registry=registry)
        self.unload_seconds = Histogram("expertweave_adapter_unload_seconds",
                                        "Time to unload an ESFT adapter, waiting for its requests included",
                                        registry=registry)
        self.hits = Counter("expertweave_adapter_hits", "Requests whose adapter was on the device", ["adapter"],
                            registry=registry)
        self.misses = Counter("expertweave_adapter_misses", "Requests whose adapter had to be loaded first",
                              ["adapter"], registry=registry)
        self.load_wait_seconds = Histogram("expertweave_adapter_load_wait_seconds",
                                           "Time a request waited for its adapter to be loaded (misses)",
                                           registry=registry)
        self.loads_by_source = Counter("expertweave_adapter_loads_by_source",
                                       "On-demand loads by where the packed adapter came from: disk, host (the host "
                                       "tier) or prefetch (the host tier, put there by a prefetch)", ["source"],
                                       registry=registry)
        self.evictions = Counter("expertweave_adapter_evictions", "Adapters taken off the device for room",
                                 ["adapter"], registry=registry)
        self.tier_bytes: dict[str, int] = {}
        self.requests: dict[str, int] = {}
        self.generated: dict[str, int] = {}
        self.resident: dict[str, int] = {}
        self.switches = (0, 0.0)  # non-expert weight switches between steps, and their seconds
        registry.register(self)

    @contextmanager
    def timed(self, histogram: Histogram):
        start = time.perf_counter()
        try:
            yield
        finally:
            histogram.observe(time.perf_counter() - start)

    def update(self, served: dict, memory: dict, base_name: str, tiers: dict) -> None:
        """served: a worker's expertweave_served() answer; memory: its MemoryReport.to_json(); tiers: its
        expertweave_tiers() answer."""
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
        for name, count in self.requests.items():
            requests.add_metric([name], count)
        for name, count in self.generated.items():
            tokens.add_metric([name], count)
        for name, nbytes in self.resident.items():
            resident.add_metric([name], nbytes)
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
        yield from (requests, tokens, resident, tiers, switches, switch_seconds)

    def describe(self):
        return []
