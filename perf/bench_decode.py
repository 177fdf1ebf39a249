"""Decode-step cost of ExpertWeave, measured so that the machine's drift cancels, and split into its parts.

Three engines run in this process on the bench model (perf/bench_model.py): plain vLLM serving the base,
plain vLLM serving the first adapter's merged model, and ExpertWeave with 20 adapters loaded. An arm is an
engine and who the requests go to: the merged engine (the control for ExpertWeave's 1-adapter arm: the same
tokens, so the same experts); ExpertWeave with every request to the base (the mechanism's fixed cost: every
token rerouted through row 0); ExpertWeave with the requests spread over 1, 5, 10 or 20 adapters; and the
ExpertWeave base arm again under a second name (A/A: the method's own noise). Each run is a short batch (16
distinct random prompts of 32 tokens, 16 tokens out) on the arm's engine and the same batch on the base-only
engine at once, the two engines stepped in turn (lockstep): step i of the arm and step i of base-only are
taken one step apart. This machine's speed drifts from one second to the next (a run's median step moves by
~12% against the run before it), and lockstep cancels that drift: an arm's step against the base-only step
beside it moves by ~2.4%. A round runs every arm once; the orders come in blocks of rotations of a shuffled
order, so that every arm runs at every place equally often (balanced_orders). Time comes from the engine:
each step is timed (wall and this process's CPU time) around vLLM's EngineCore step, and only decode steps of
the whole batch count; a run gives each engine's median step.
A comparison against base-only pairs each run of the arm with the base-only steps beside it; a comparison of
two arms pairs their runs of one round, each relative to the base-only steps beside it. Ratios are of the
means over the rounds, with a paired bootstrap interval, and the median of the rounds' ratios beside it
(stats.py). The rounds are spread over several builds of the three engines: each build places the weights
and expert granules in memory anew, so the interval resamples builds, then the rounds within them.

The split times each part of the difference at 20 adapters inside the engines, over rounds of its own in
which two arms, each in lockstep with the base-only engine, alternate (ExpertWeave's mixed batch,
ExpertWeave's base requests): the reroute of every MoE layer, the per-step row fill and request
accounting; the scheduler, ExpertWeave's against vLLM's; vLLM's MoE kernel on the same expert ids,
ExpertWeave's memfd-backed expert tensors against the anonymous pages torch allocates (the memory effect of
virtual tensors); and the MoE kernel on ExpertWeave's tensors, the mixed batch's ids against the base
requests' (the extra distinct experts a mixed batch touches), each against the base-only steps beside it.
The Python parts are timed by wrapping them; the MoE kernel and the reroute by torch's profiler in runs of
their own, each engine's calls told apart by a profiler range around its steps. The reroute is traced into
the compiled graph, so it is what ExpertWeave's step runs that the base-only step beside it does not: the
graph's kernels (compiled with Inductor's per-kernel profiler ranges) and the ops called outside a graph,
counted by name, the base-only lane's subtracted from ExpertWeave's (a kernel the reroute fused into counts
whole, so the part is an upper bound). Each
part is wall time per full-batch decode step (CPU time would overcount single-threaded Python while torch's
threads spin); their sum is checked against the total difference.
Run: .venv/bin/python -m perf.bench_decode [--rounds 84] [--instances 6] [--adapter-counts 1,5,10,20]
     [--no-merged-engine] [--eager] [--json FILE]
"""

import argparse
import bisect
import contextlib
import itertools
import json
import math
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from .bench_model import BENCH_CONFIG, build, merged
from .stats import difference_interval, median_ratio_interval, ratio_interval

BATCH = 16
TOKENS = 16
ADAPTER_COUNTS = (1, 5, 10, 20)
PROMPT_TOKENS = 32
SPLIT_ROUNDS = 6  # per engine build: a multiple of its 2 arms
REFERENCE = "base-only"  # the engine every arm runs beside
GRAPH_KERNEL = re.compile(r"^graph_\d+_(?P<fused>cpp_fused_.*?)_\d+$")  # Inductor's name of a kernel of a graph


def prompts(vocab_size: int) -> list[dict]:
    """Distinct random prompts, so that each arm's batch routes its tokens as diversely as real traffic does
    (near-identical prompts decode near-identical tokens, which touch far fewer experts)."""
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(3, vocab_size) for _ in range(PROMPT_TOKENS)]} for _ in range(BATCH)]


class StepClock:
    """Times an in-process engine's steps: (wall s, CPU s) of each decode step that runs the whole batch.
    `decoding` says whether the step under way is one of those, for the Stopwatch."""

    def __init__(self, llm):
        core = llm.llm_engine.engine_core.engine_core
        self.scheduler = core.scheduler
        self.steps: list[tuple[float, float]] = []
        self.schedule_s = 0.0
        self.decoding = False
        schedule, step = self.scheduler.schedule, core.step_fn

        def timed_schedule(*args, **kwargs):
            started = time.perf_counter()
            output = schedule(*args, **kwargs)
            self.decoding = (output.total_num_scheduled_tokens == BATCH
                             and len(output.num_scheduled_tokens) == BATCH)
            if self.decoding:
                self.schedule_s += time.perf_counter() - started
            return output

        def timed_step():
            wall, cpu = time.perf_counter(), time.process_time()
            result = step()
            if self.decoding:
                self.steps.append((time.perf_counter() - wall, time.process_time() - cpu))
            self.decoding = False
            return result

        self.scheduler.schedule, core.step_fn = timed_schedule, timed_step

    def reset(self) -> None:
        self.steps.clear()
        self.schedule_s = 0.0


class Stopwatch:
    """Adds up the wall time of calls to chosen functions, in full-batch decode steps only (`gate`)."""

    def __init__(self, gate):
        self.gate, self.seconds, self._undo = gate, {}, []

    def wrap(self, owner, name: str, part: str) -> None:
        """Times owner.name as `part`."""
        method, own = getattr(owner, name), name in vars(owner)
        self.seconds[part] = 0.0

        def timed(*args, **kwargs):
            if not self.gate():
                return method(*args, **kwargs)
            started = time.perf_counter()
            result = method(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - started
            return result

        setattr(owner, name, timed)
        self._undo.append((owner, name, method if own else None))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for owner, name, method in reversed(self._undo):
            if method is None:
                delattr(owner, name)
            else:
                setattr(owner, name, method)


def balanced_orders(arms: list[str], rounds: int, shuffle) -> list[list[str]]:
    """Orders of the arms for `rounds` rounds (a multiple of the arms): blocks of rotations of a shuffled order,
    so that within each block every arm runs once at every place. A round's later runs are slower than its
    first (by 3% here), and random orders put one arm early more often than another."""
    orders = []
    for _ in range(rounds // len(arms)):
        shuffle(arms)
        orders += [arms[shift:] + arms[:shift] for shift in range(len(arms))]
    return orders


def host_pages() -> dict:
    """Which transparent huge pages this host gives: to anonymous memory (torch's tensors, had they asked)
    and to shmem (the memfd granules, which ask for them at 2 MiB)."""
    thp = Path("/sys/kernel/mm/transparent_hugepage")

    def chosen(name: str) -> str:
        path = thp / name
        return path.read_text().split("[")[1].split("]")[0] if path.exists() else "absent"

    return {"anonymous_thp": chosen("enabled"), "shmem_thp": chosen("shmem_enabled")}


def beside(samples: dict, a: str, b: str) -> tuple[list[float], list[float]]:
    """The pairs comparing arm a with b: a's runs and the base-only steps beside them (b is base-only), or
    a's and b's runs of each round, each relative to the base-only steps beside it."""
    runs, reference = samples["runs"], samples[REFERENCE]
    if b == REFERENCE:
        return runs[a], reference[a]
    return ([x / y for x, y in zip(runs[a], reference[a])], [x / y for x, y in zip(runs[b], reference[b])])


def _mean_ms(seconds) -> float:
    return 1000 * statistics.fmean(seconds)


def measure(rounds: int = 84, eager: bool = False, progress=print, instances: int = 6,
            adapter_counts: tuple[int, ...] = ADAPTER_COUNTS, merged_engine: bool = True,
            split_rounds: int = SPLIT_ROUNDS) -> dict:
    """rounds in all, spread over `instances` builds of the engines (memory placed anew each time); the merged
    model's engine and its arm only where merged_engine (the 1-adapter arm's control)."""
    import torch._inductor.config

    if instances < 1 or rounds % instances:
        raise ValueError(f"{rounds} rounds do not split evenly over {instances} engine instances")
    if split_rounds < 2 or split_rounds % 2:
        raise ValueError(f"{split_rounds} split rounds: needs a multiple of its 2 arms")
    torch._inductor.config.cpp.enable_kernel_profile = True  # every engine alike: the split names the kernels
    base, adapters = build()
    names = list(adapters)[:max(adapter_counts)]
    batch = prompts(json.loads((base / "config.json").read_text())["vocab_size"])
    merged_arm = f"merged model of {names[0]}"
    arms = {merged_arm: ("merged", None)} if merged_engine else {}
    arms.update({"expertweave, base requests": ("expertweave", [None] * BATCH),
                 "expertweave, base requests (A/A)": ("expertweave", [None] * BATCH)})
    for k in adapter_counts:
        arms[f"expertweave, {k} adapters"] = ("expertweave", [names[i % k] for i in range(BATCH)])
    per = rounds // instances
    if per % len(arms):
        raise ValueError(f"{per} rounds per engine instance: needs a multiple of the {len(arms)} arms, "
                         "so that every arm runs at every place of a round equally often")
    samples = {clock: {series: {arm: [] for arm in arms} for series in ("runs", REFERENCE)} for clock in ("wall", "cpu")}
    top = f"expertweave, {max(adapter_counts)} adapters"
    split_totals = {}
    shuffle = random.Random(0).shuffle
    for instance in range(instances):
        with Engines(base, adapters, names, eager, batch, merged_engine) as engines:
            for lane in arms.values():  # warm up
                engines.run(*lane)
            for order in balanced_orders(list(arms), per, shuffle):
                for arm in order:
                    for series, steps in zip(("runs", REFERENCE), engines.run(*arms[arm])):
                        wall, cpu = zip(*steps)
                        samples["wall"][series][arm].append(statistics.median(wall))
                        samples["cpu"][series][arm].append(statistics.median(cpu))
            for lane, parts in engines.split(arms[top][1], split_rounds).items():
                split_totals.setdefault(lane, Counter()).update(parts)
            progress(f"decode: engine instance {instance + 1} of {instances} done")
    groups = [r // per for r in range(rounds)] if instances > 1 else None
    comparisons = {"A/A": ("expertweave, base requests (A/A)", "expertweave, base requests")}
    if merged_engine:
        comparisons["merged model vs base-only (two plain vLLM engines)"] = (merged_arm, REFERENCE)
    comparisons["fixed cost (base requests)"] = ("expertweave, base requests", REFERENCE)
    if merged_engine and 1 in adapter_counts:
        comparisons["1 adapter vs its merged model"] = ("expertweave, 1 adapters", merged_arm)
    for k in adapter_counts:
        comparisons[f"{k} adapters, same engine"] = (f"expertweave, {k} adapters", "expertweave, base requests")
        comparisons[f"{k} adapters vs base-only"] = (f"expertweave, {k} adapters", REFERENCE)
    ratios = {}
    for label, (a, b) in comparisons.items():
        cpu_a, cpu_b = beside(samples["cpu"], a, b)
        ratios[label] = {"cpu": ratio_interval(cpu_a, cpu_b, groups=groups).to_json(),
                         "cpu_median": median_ratio_interval(cpu_a, cpu_b, groups=groups).to_json(),
                         "wall": ratio_interval(*beside(samples["wall"], a, b), groups=groups).to_json(),
                         "per_instance": [statistics.fmean(cpu_a[i:i + per]) / statistics.fmean(cpu_b[i:i + per])
                                          for i in range(0, rounds, per)],
                         "arms": [a, b]}
    split = split_parts(split_totals)
    total = difference_interval(samples["wall"]["runs"][top], samples["wall"][REFERENCE][top], groups=groups)
    wall, cpu = samples["wall"], samples["cpu"]
    steps_ms = {REFERENCE: {"step_ms": _mean_ms(x for v in wall[REFERENCE].values() for x in v),
                            "step_cpu_ms": _mean_ms(x for v in cpu[REFERENCE].values() for x in v)}}
    for arm in arms:
        steps_ms[arm] = {"step_ms": _mean_ms(wall["runs"][arm]), "step_cpu_ms": _mean_ms(cpu["runs"][arm]),
                         "base_only_beside_ms": _mean_ms(wall[REFERENCE][arm])}
    return {"config": BENCH_CONFIG, "batch": BATCH, "tokens": TOKENS, "rounds": rounds, "instances": instances,
            "eager": eager, "merged_engine": merged_engine, "arms": steps_ms,
            "ratios": ratios,
            "samples": samples,
            "split": {"adapters": max(adapter_counts), "rounds": split_rounds * instances, **split,
                      "sum_us": sum(split["parts_us"].values()),
                      "total_us": {"difference": 1e6 * total.value, "low": 1e6 * total.low, "high": 1e6 * total.high},
                      "pages": host_pages()}}


class Engines:
    """One instance of the engines (base-only, ExpertWeave, the merged model's where asked), in this process so
    that their steps can be timed and interleaved."""

    def __init__(self, base: Path, adapters: dict, names: list[str], eager: bool, batch: list[dict],
                 merged_engine: bool = True):
        self.base, self.adapters, self.names, self.eager, self.batch = base, adapters, names, eager, batch
        self.merged_engine = merged_engine

    def __enter__(self):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM, SamplingParams

        from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

        engine = dict(max_model_len=512, kv_cache_memory_bytes=256 << 20, enforce_eager=self.eager)
        first = self.names[0]
        self.llms = {REFERENCE: LLM(model=str(self.base), **engine)}
        if self.merged_engine:
            self.llms["merged"] = LLM(model=str(merged(self.base, {first: self.adapters[first]})[first]), **engine)
        self.weave = ExpertWeaveLLM(str(self.base), {n: str(self.adapters[n]) for n in self.names},
                                    max_adapters=len(self.names), **engine)
        self.llms["expertweave"] = self.weave.llm
        self.clocks = {name: StepClock(llm) for name, llm in self.llms.items()}
        self.params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
        self.request_ids = itertools.count()
        return self

    def __exit__(self, *exc):
        from vllm import envs

        self.weave.shutdown()
        for name, llm in self.llms.items():
            if name != "expertweave":
                llm.llm_engine.engine_core.shutdown()
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        envs.disable_envs_cache()

    def run(self, engine: str, mix, label_steps: bool = False) -> list[list[tuple[float, float]]]:
        """The batch on this engine (mix: each request's adapter, or None for plain vLLM) and on the base-only
        engine, the two stepped in turn until both are done: the (wall, CPU) seconds of each one's full-batch
        decode steps, this engine's first. label_steps: each engine's steps run in a profiler range, "lane 0"
        for this engine's, "lane 1" for base-only's."""
        from torch.profiler import record_function

        lanes = [(engine, mix), (REFERENCE, None)]
        for name, lane_mix in lanes:
            requests = ([(prompt, self.params) for prompt in self.batch] if lane_mix is None else
                        zip(*self.weave.vllm_requests(self.batch, [self.params] * BATCH, lane_mix)))
            for prompt, params in requests:
                self.llms[name].llm_engine.add_request(str(next(self.request_ids)), prompt, params)
            self.clocks[name].reset()
        cores = [self.llms[name].llm_engine for name, _ in lanes]
        while any(core.has_unfinished_requests() for core in cores):
            for place, ((name, _), core) in enumerate(zip(lanes, cores)):
                if core.has_unfinished_requests():
                    self.current = self.clocks[name]
                    with record_function(f"lane {place}") if label_steps else contextlib.nullcontext():
                        core.step()
        steps = [list(self.clocks[name].steps) for name, _ in lanes]
        if not all(steps):
            raise RuntimeError("no decode step ran the whole batch: raise the engine's token budget or seats")
        return steps

    def split(self, mix, rounds: int) -> dict:
        """Seconds and steps of each part per lane (an ExpertWeave arm, or the base-only engine beside it), in
        full-batch decode steps of two arms alternating over `rounds`, each in lockstep with the base-only
        engine: ExpertWeave at this adapter mix, and with base requests. Timed inside the engines:
        ExpertWeave's per-step work and each engine's scheduler by wrapping them; vLLM's MoE kernel, which the
        compiled graph calls directly, by torch's profiler, in runs of their own (the profiler would slow the
        Python parts)."""
        from torch.profiler import ProfilerActivity, profile

        from expertweave_ascend.integrations.vllm import worker

        arms = {"mixed": ("expertweave", mix), "base requests": ("expertweave", [None] * BATCH)}
        totals = {lane: Counter() for arm in arms for lane in (arm, f"{arm}: {REFERENCE}")}
        with Stopwatch(lambda: self.current.decoding) as watch:
            active = self.weave.llm.collective_rpc(worker.weave_of)[0]
            for part, name in (("row_fill", "on_step"), ("accounting", "on_schedule")):
                watch.wrap(active, name, part)
            for order in balanced_orders(list(arms), rounds, random.Random(1).shuffle):
                for arm in order:
                    lanes = (totals[arm], totals[f"{arm}: {REFERENCE}"])
                    before = dict(watch.seconds)
                    for total, steps in zip(lanes, self.run(*arms[arm])):
                        total["steps"] += len(steps)
                    for total, engine in zip(lanes, ("expertweave", REFERENCE)):
                        total["scheduler"] += self.clocks[engine].schedule_s
                    lanes[0].update({part: seconds - before[part] for part, seconds in watch.seconds.items()})
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
                        profiled_steps = self.run(*arms[arm], label_steps=True)
                    moe, ran = profiled_seconds(profiled.events())
                    for place, (total, steps) in enumerate(zip(lanes, profiled_steps)):
                        total.update(profiled_steps=len(steps), moe=moe[place])
                    lanes[0]["reroute"] += added_seconds(ran)
        return totals


def profiled_seconds(events) -> tuple[Counter, list[dict[str, list[float]]]]:
    """Per lane (Engines.run's "lane <place>" ranges), in full-batch decode steps: the seconds in vLLM's MoE
    kernel, and [calls, seconds] of each kernel the compiled graph ran and each op called outside a graph, by
    name (the graph's and the kernel's numbers dropped, so that two engines' graphs compare)."""
    def full_batch_moe(e) -> bool:
        return e.name.endswith("cpu_fused_moe") and bool(e.input_shapes) and e.input_shapes[1][0] == BATCH

    moe_starts = sorted(e.time_range.start for e in events if full_batch_moe(e))
    decoding = []  # (start, end, place) of each lane's steps that ran the whole batch
    for e in events:
        if e.name.startswith("lane "):
            start, end = e.time_range.start, e.time_range.end
            first = bisect.bisect_left(moe_starts, start)
            if first < len(moe_starts) and moe_starts[first] <= end:
                decoding.append((start, end, int(e.name.split()[1])))
    decoding.sort()
    moe, ran = Counter(), [{}, {}]
    for e in events:
        i = bisect.bisect_right(decoding, (e.time_range.start, math.inf, 0)) - 1
        if i < 0 or e.time_range.start > decoding[i][1]:
            continue
        place = decoding[i][2]
        if full_batch_moe(e):
            moe[place] += 1e-6 * e.cpu_time_total
        kernel = GRAPH_KERNEL.match(e.name)
        if kernel or (e.name.startswith("aten::") and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::"))):
            seen = ran[place].setdefault(kernel["fused"] if kernel else e.name, [0, 0.0])
            seen[0] += 1
            seen[1] += 1e-6 * e.cpu_time_total
    return moe, ran


def added_seconds(ran: list[dict[str, list[float]]]) -> float:
    """The seconds of what the first lane ran beyond the second: of each name it called more often, the share
    of its calls beyond the second lane's."""
    ours, theirs = ran
    return sum(seconds * (calls - theirs.get(name, (0, 0.0))[0]) / calls
               for name, (calls, seconds) in ours.items() if calls > theirs.get(name, (0, 0.0))[0])


def split_parts(totals: dict) -> dict:
    """us per decode step of each part of the difference between the mixed arm and the base-only engine."""
    per_step = {lane: {**{k: 1e6 * t[k] / t["steps"] for k in ("scheduler", "row_fill", "accounting")},
                       **{k: 1e6 * t[k] / t["profiled_steps"] for k in ("moe", "reroute")}}
                for lane, t in totals.items()}
    mixed, base = per_step["mixed"], per_step["base requests"]
    mixed_beside, base_beside = per_step[f"mixed: {REFERENCE}"], per_step[f"base requests: {REFERENCE}"]
    parts = {"reroute": mixed["reroute"], "row_fill": mixed["row_fill"], "accounting": mixed["accounting"],
             "scheduler": mixed["scheduler"] - mixed_beside["scheduler"],
             "memfd_pages": base["moe"] - base_beside["moe"],  # the same expert ids, ExpertWeave's pages vs torch's
             # the same pages, the mixed batch's ids vs the base's, each against the base-only steps beside it
             "extra_experts": (mixed["moe"] - mixed_beside["moe"]) - (base["moe"] - base_beside["moe"])}
    return {"parts_us": parts, "moe_us": {lane: p["moe"] for lane, p in per_step.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=84)
    parser.add_argument("--instances", type=int, default=6, help="builds of the engines the rounds are spread over")
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--adapter-counts", default=",".join(map(str, ADAPTER_COUNTS)),
                        help="comma-separated adapter counts, one arm each")
    parser.add_argument("--no-merged-engine", action="store_true", help="leave out the merged model's engine and arm")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.rounds, args.eager, instances=args.instances,
                     adapter_counts=tuple(int(n) for n in args.adapter_counts.split(",")),
                     merged_engine=not args.no_merged_engine)
    print(f"{'arm':<36}{'step ms':>10}{'CPU ms':>10}{'base-only beside, ms':>22}")
    for arm, r in result["arms"].items():
        print(f"{arm:<36}{r['step_ms']:>10.2f}{r['step_cpu_ms']:>10.2f}{r.get('base_only_beside_ms', r['step_ms']):>22.2f}")
    interval = lambda c: f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"  # noqa: E731
    print(f"\n{'comparison':<52}{'CPU, ratio of means':>26}{'CPU, median ratio':>26}{'wall':>26}")
    for label, r in result["ratios"].items():
        print(f"{label:<52}{interval(r['cpu']):>26}{interval(r['cpu_median']):>26}{interval(r['wall']):>26}")
    s = result["split"]
    print(f"\nsplit at {s['adapters']} adapters, us (wall) per decode step of {BATCH} tokens:")
    for part, us in s["parts_us"].items():
        print(f"  {part:<16}{us:>10.1f}")
    t = s["total_us"]
    print(f"  {'sum':<16}{s['sum_us']:>10.1f}   total measured {t['difference']:.1f} [{t['low']:.1f}, {t['high']:.1f}]")
    print("  MoE kernel us per step: " + ", ".join(f"{lane} {us:.0f}" for lane, us in s["moe_us"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
