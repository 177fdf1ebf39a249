"""Decode-step cost of ExpertWeave, measured so that the machine's drift cancels, and split into its parts.

Three engines run in this process on the bench model (perf/bench_model.py): plain vLLM serving the base,
plain vLLM serving the first adapter's merged model, and ExpertWeave with 20 adapters loaded. An arm is an
engine and who the requests go to: the base-only engine; the merged engine (the control for ExpertWeave's
1-adapter arm: the same tokens, so the same experts); ExpertWeave with every request to the base (the
mechanism's fixed cost: every token rerouted through row 0); ExpertWeave with the requests spread over 1, 5,
10 or 20 adapters; and the ExpertWeave base arm again under a second name (A/A: the method's own noise). A
round runs every arm once, in a shuffled order; each run is a short batch (16 distinct random prompts of 32
tokens, 16 tokens out), so arms alternate every 15 decode steps. Time comes from the engine:
each step is timed (wall and this process's CPU time, which a core taken by another process does not
inflate) around vLLM's EngineCore step, and only decode steps of the whole batch count. A ratio compares
two arms over the rounds: mean step time over mean step time, with a paired bootstrap interval (stats.py).
The rounds are spread over several builds of the three engines: each build places the weights and expert
granules in memory anew, and two builds of the same engines differ by more than two rounds on one build
do (a 20-adapter arm moved from x1.02 to x1.07 between runs), so the interval resamples builds, then the
rounds within them.

The split times each part of the difference on its own (wall time: the parts are single-threaded Python,
which CPU time would overcount while torch's threads spin), per decode step of 16 tokens at 20 adapters: the
reroute op of every MoE layer and the per-step row fill and request accounting, timed inside the engine;
the scheduler, ExpertWeave's against vLLM's; and, outside the engine on the bench model's MoE layer shapes,
the extra distinct experts a mixed batch touches and the expert tensor's pages (memfd granules against
the anonymous pages torch allocates). The parts add up to a sum the total difference is checked against.
Run: .venv/bin/python -m perf.bench_decode [--rounds 90] [--instances 6] [--json FILE]
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from .bench_model import BENCH_CONFIG, MOE_LAYERS, build, merged
from .stats import difference_interval, ratio_interval

BATCH = 16
TOKENS = 16
ADAPTER_COUNTS = (1, 5, 10, 20)
PROMPT_TOKENS = 32


def prompts(vocab_size: int) -> list[dict]:
    """Distinct random prompts, so that each arm's batch routes its tokens as diversely as real traffic does
    (near-identical prompts decode near-identical tokens, which touch far fewer experts)."""
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, vocab_size) for _ in range(PROMPT_TOKENS)]} for _ in range(BATCH)]


class StepClock:
    """Times an in-process engine's steps: (wall s, CPU s) of each decode step that runs the whole batch."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.steps: list[tuple[float, float]] = []
        self.schedule_s = 0.0
        self._tokens = self._requests = 0
        schedule, step = self.scheduler.schedule, core.step_fn

        def timed_schedule(*args, **kwargs):
            started = time.perf_counter()
            output = schedule(*args, **kwargs)
            self.schedule_s += time.perf_counter() - started
            self._tokens, self._requests = output.total_num_scheduled_tokens, len(output.num_scheduled_tokens)
            return output

        def timed_step():
            wall, cpu = time.perf_counter(), time.process_time()
            result = step()
            if self._requests == BATCH and self._tokens == BATCH:
                self.steps.append((time.perf_counter() - wall, time.process_time() - cpu))
            return result

        self.scheduler.schedule, core.step_fn = timed_schedule, timed_step

    def reset(self) -> None:
        self.steps.clear()
        self.schedule_s = 0.0


class PartClock:
    """Accumulates the time of ExpertWeave's per-step work inside the engine (worker.py)."""

    PARTS = {"reroute": "reroute", "row_fill": "on_step", "accounting": "on_schedule"}

    def __init__(self, active):
        self.active, self.seconds = active, {part: 0.0 for part in self.PARTS}

    def __enter__(self):
        for part, name in self.PARTS.items():
            setattr(self.active, name, self._timed(part, getattr(self.active, name)))
        return self

    def __exit__(self, *exc):
        for name in self.PARTS.values():
            delattr(self.active, name)

    def _timed(self, part, method):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started
        return timed


def run(llm, batch: list[dict], names, clock: StepClock) -> tuple[float, float]:
    """One batch; the mean (wall, CPU) seconds of its full-batch decode steps."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    clock.reset()
    if names is None:
        llm.generate(batch, params, use_tqdm=False)
    else:
        llm.generate(batch, params, adapter=names, use_tqdm=False)
    if not clock.steps:
        raise RuntimeError("no decode step ran the whole batch: raise the engine's token budget or seats")
    wall, cpu = zip(*clock.steps)
    return statistics.fmean(wall), statistics.fmean(cpu)


def moe_parts(names: list[str], adapters: dict, blocks: int = 101) -> dict:
    """Microseconds per decode step (all MoE layers) of cpu_fused_moe at the bench shapes on 16 tokens:
    base ids on anonymous pages, the mixed batch's rerouted ids on anonymous pages, and the same on memfd
    granules (ExpertWeave's host backend). Each is the median over blocks of 8 steps of real routing, the
    three alternating, so that a pause of the machine does not land on one of them."""
    import torch
    from vllm._custom_ops import cpu_fused_moe, cpu_prepack_moe_weight

    from expertweave_ascend.adapters import EsftAdapter
    from expertweave_ascend.memory.host_backend import HostBackend

    from .esft_data import router_trace
    from .reroute_share import TRACE_LAYER, cpu_isa

    hidden, inter, experts = BENCH_CONFIG["hidden_size"], BENCH_CONFIG["moe_intermediate_size"], BENCH_CONFIG["n_routed_experts"]
    isa = cpu_isa()
    g = torch.Generator().manual_seed(0)
    per_layer = {}
    for layer in MOE_LAYERS:
        tuned = {n: EsftAdapter.open(adapters[n]).experts.get(layer, ()) for n in names}
        slots = experts + sum(len(t) for t in tuned.values())
        table = [list(range(experts))]
        next_slot = experts
        for n in names:
            row = list(range(experts))
            for e in tuned[n]:
                row[e], next_slot = next_slot, next_slot + 1
            table.append(row)
        table = torch.tensor(table, dtype=torch.int32)
        w13 = cpu_prepack_moe_weight((torch.randn(slots, 2 * inter, hidden, generator=g) * 0.02).to(torch.bfloat16), isa)
        w2 = cpu_prepack_moe_weight((torch.randn(slots, hidden, inter, generator=g) * 0.02).to(torch.bfloat16), isa)
        trace = router_trace("law", TRACE_LAYER)
        ids = trace[:BATCH * 8].view(8, BATCH, -1)  # 8 steps of real routing, replayed
        rows = torch.tensor([1 + i % len(names) for i in range(BATCH)])
        rerouted = torch.stack([table[rows[:, None], step.long()] for step in ids]).to(torch.int32)
        x = (torch.randn(BATCH, hidden, generator=g)).to(torch.bfloat16)
        weights = torch.full((BATCH, ids.shape[-1]), 1.0 / ids.shape[-1])
        backend = HostBackend(granularity=2 << 20)
        try:
            mapped = {}
            for name, w in (("w13", w13), ("w2", w2)):
                size = -(-w.numel() * w.element_size() // backend.granularity) * backend.granularity
                address = backend.reserve(size)
                for offset in range(0, size, backend.granularity):
                    backend.map(address + offset, backend.granularity, backend.create_physical(backend.granularity))
                mapped[name] = backend.tensor(address, tuple(w.shape), w.dtype)
                mapped[name].copy_(w)

            out = torch.empty_like(x)
            variants = {"base_ids": (ids, w13, w2), "mixed_ids": (rerouted, w13, w2),
                        "mixed_ids_memfd": (rerouted, mapped["w13"], mapped["w2"])}
            per_block = {name: [] for name in variants}
            order = list(variants)
            for block in range(blocks):  # the variants alternate in short blocks
                random.Random(block).shuffle(order)
                for name in order:
                    ids_steps, w13_, w2_ = variants[name]
                    for step in ids_steps:  # warm: the memfd copy shares no cache lines with the other two
                        cpu_fused_moe(out, x, w13_, w2_, None, None, weights, step, "silu", isa)
                    started = time.perf_counter()
                    for step in ids_steps:
                        cpu_fused_moe(out, x, w13_, w2_, None, None, weights, step, "silu", isa)
                    per_block[name].append((time.perf_counter() - started) / len(ids_steps))
            per_layer[layer] = {
                **{name: statistics.median(times) for name, times in per_block.items()},
                "distinct_base": statistics.fmean(len(set(s.flatten().tolist())) for s in ids),
                "distinct_mixed": statistics.fmean(len(set(s.flatten().tolist())) for s in rerouted),
            }
        finally:
            mapped.clear()  # the views go before their pages
            backend.close()
    total = {k: sum(v[k] for v in per_layer.values()) for k in ("base_ids", "mixed_ids", "mixed_ids_memfd")}
    return {"extra_experts_us": (total["mixed_ids"] - total["base_ids"]) * 1e6,
            "memfd_pages_us": (total["mixed_ids_memfd"] - total["mixed_ids"]) * 1e6,
            "moe_base_us": total["base_ids"] * 1e6,
            "distinct_experts_per_layer": {"base": statistics.fmean(v["distinct_base"] for v in per_layer.values()),
                                           "mixed": statistics.fmean(v["distinct_mixed"] for v in per_layer.values())}}


def host_pages() -> dict:
    """Which transparent huge pages this host gives: to anonymous memory (torch's tensors, had they asked)
    and to shmem (the memfd granules, which ask for them at 2 MiB)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage")

    def chosen(name: str) -> str:
        path = thp / name
        return path.read_text().split("[")[1].split("]")[0] if path.exists() else "absent"

    return {"anonymous_thp": chosen("enabled"), "shmem_thp": chosen("shmem_enabled")}


def measure(rounds: int = 90, eager: bool = False, progress=print, instances: int = 6) -> dict:
    """rounds in all, spread over `instances` builds of the three engines (memory placed anew each time)."""
    if instances < 2 or rounds % instances:
        raise ValueError(f"{rounds} rounds do not split evenly over {instances} engine instances (2 or more)")
    base, adapters = build()
    names = list(adapters)[:max(ADAPTER_COUNTS)]
    batch = prompts(json.loads((base / "config.json").read_text())["vocab_size"])
    arms = {"base-only": ("base-only", None), f"merged model of {names[0]}": ("merged", None),
            "expertweave, base requests": ("expertweave", [None] * BATCH),
            "expertweave, base requests (A/A)": ("expertweave", [None] * BATCH)}
    for k in ADAPTER_COUNTS:
        arms[f"expertweave, {k} adapters"] = ("expertweave", [names[i % k] for i in range(BATCH)])
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    per = rounds // instances
    shuffle = random.Random(0).shuffle
    for instance in range(instances):
        with Engines(base, adapters, names, eager) as engines:
            for engine, mix in arms.values():  # warm up
                engines.run(engine, mix, batch)
            order = list(arms)
            for _ in range(per):
                shuffle(order)
                for arm in order:
                    w, c = engines.run(*arms[arm], batch)
                    wall[arm].append(w)
                    cpu[arm].append(c)
            progress(f"decode: engine instance {instance + 1} of {instances} done")
            if instance == instances - 1:
                split = engines.split(batch, arms[f"expertweave, {max(ADAPTER_COUNTS)} adapters"][1])
    groups = [r // per for r in range(rounds)]
    top = f"expertweave, {max(ADAPTER_COUNTS)} adapters"
    comparisons = {"A/A": ("expertweave, base requests (A/A)", "expertweave, base requests"),
                   "fixed cost (base requests)": ("expertweave, base requests", "base-only"),
                   "1 adapter vs its merged model": ("expertweave, 1 adapters", f"merged model of {names[0]}")}
    for k in ADAPTER_COUNTS:
        comparisons[f"{k} adapters, same engine"] = (f"expertweave, {k} adapters", "expertweave, base requests")
        comparisons[f"{k} adapters vs base-only"] = (f"expertweave, {k} adapters", "base-only")
    moe = moe_parts(names, adapters)
    split["extra_experts"] = moe["extra_experts_us"]
    split["memfd_pages"] = moe["memfd_pages_us"]
    total = difference_interval(wall[top], wall["base-only"], groups=groups)
    return {"config": BENCH_CONFIG, "batch": BATCH, "tokens": TOKENS, "rounds": rounds, "instances": instances,
            "eager": eager,
            "arms": {arm: {"step_ms": 1000 * statistics.fmean(wall[arm]),
                           "step_cpu_ms": 1000 * statistics.fmean(cpu[arm])} for arm in arms},
            "ratios": {label: {"cpu": ratio_interval(cpu[a], cpu[b], groups=groups).to_json(),
                               "wall": ratio_interval(wall[a], wall[b], groups=groups).to_json(),
                               "per_instance": [statistics.fmean(cpu[a][i:i + per]) / statistics.fmean(cpu[b][i:i + per])
                                                for i in range(0, rounds, per)],
                               "arms": [a, b]}
                       for label, (a, b) in comparisons.items()},
            "samples": {"wall": wall, "cpu": cpu},
            "split": {"adapters": max(ADAPTER_COUNTS), "parts_us": split, "sum_us": sum(split.values()),
                      "total_us": {"difference": 1e6 * total.value, "low": 1e6 * total.low, "high": 1e6 * total.high},
                      "moe_base_us": moe["moe_base_us"], "pages": host_pages(),
                      "distinct_experts_per_layer": moe["distinct_experts_per_layer"]}}


class Engines:
    """One instance of the three engines, in this process so that their steps can be timed."""

    def __init__(self, base: Path, adapters: dict, names: list[str], eager: bool):
        self.base, self.adapters, self.names, self.eager = base, adapters, names, eager

    def __enter__(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

        engine = dict(max_model_len=512, kv_cache_memory_bytes=256 << 20, enforce_eager=self.eager)
        first = self.names[0]
        self.llms = {"base-only": LLM(model=str(self.base), **engine),
                     "merged": LLM(model=str(merged(self.base, {first: self.adapters[first]})[first]), **engine)}
        self.weave = ExpertWeaveLLM(str(self.base), {n: str(self.adapters[n]) for n in self.names},
                                    max_adapters=len(self.names), **engine)
        self.llms["expertweave"] = self.weave
        self.clocks = {name: StepClock(llm.llm if llm is self.weave else llm) for name, llm in self.llms.items()}
        return self

    def __exit__(self, *exc):
        from vllm import envs

        self.weave.shutdown()
        for name in ("base-only", "merged"):
            self.llms[name].llm_engine.engine_core.shutdown()
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        envs.disable_envs_cache()

    def run(self, engine: str, mix, batch: list[dict]) -> tuple[float, float]:
        return run(self.llms[engine], batch, mix, self.clocks[engine])

    def split(self, batch: list[dict], mix) -> dict:
        """The in-engine parts at this adapter mix (us per decode step), over instrumented batches of their own:
        ExpertWeave's per-step work, and its scheduler against vLLM's."""
        from expertweave_ascend.integrations.vllm import worker

        steps = 0
        schedule = {"base-only": 0.0, "expertweave": 0.0}
        with PartClock(worker._ACTIVE) as parts:
            for _ in range(10):
                for engine, engine_mix in (("expertweave", mix), ("base-only", None)):
                    self.run(engine, engine_mix, batch)
                    schedule[engine] += self.clocks[engine].schedule_s
                steps += TOKENS
        split = {part: 1e6 * s / steps for part, s in parts.seconds.items()}
        split["scheduler"] = 1e6 * (schedule["expertweave"] - schedule["base-only"]) / steps
        return split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=90)
    parser.add_argument("--instances", type=int, default=6, help="builds of the engines the rounds are spread over")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.rounds, args.eager, instances=args.instances)
    print(f"{'arm':<36}{'step ms':>10}{'CPU ms':>10}")
    for arm, r in result["arms"].items():
        print(f"{arm:<36}{r['step_ms']:>10.2f}{r['step_cpu_ms']:>10.2f}")
    print(f"\n{'comparison':<36}{'CPU time ratio [95% interval]':>34}{'wall':>28}   per engine instance (CPU)")
    for label, r in result["ratios"].items():
        c, w = r["cpu"], r["wall"]
        print(f"{label:<36}{c['value']:>14.3f} [{c['low']:.3f}, {c['high']:.3f}]"
              f"{w['value']:>14.3f} [{w['low']:.3f}, {w['high']:.3f}]   "
              + " ".join(f"{v:.3f}" for v in r["per_instance"]))
    s = result["split"]
    print(f"\nsplit at {s['adapters']} adapters, us (wall) per decode step of {BATCH} tokens:")
    for part, us in s["parts_us"].items():
        print(f"  {part:<16}{us:>10.1f}")
    t = s["total_us"]
    print(f"  {'sum':<16}{s['sum_us']:>10.1f}   total measured {t['difference']:.1f} [{t['low']:.1f}, {t['high']:.1f}]")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
