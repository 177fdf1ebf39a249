"""Decode-step cost of ExpertWeave, measured so that the machine's drift cancels, and split into its parts.

Three engines run in this process on the bench model (perf/bench_model.py): plain vLLM serving the base,
plain vLLM serving the first adapter's merged model, and ExpertWeave with 20 adapters loaded. An arm is an
engine and who the requests go to: the base-only engine; the merged engine (the control for ExpertWeave's
1-adapter arm: the same tokens, so the same experts); ExpertWeave with every request to the base (the
mechanism's fixed cost: every token rerouted through row 0); ExpertWeave with the requests spread over 1, 5,
10 or 20 adapters; and the ExpertWeave base arm again under a second name (A/A: the method's own noise). A
round runs every arm once; the orders come in blocks of rotations of a shuffled order, so that every arm
runs at every place equally often (balanced_orders); each run is a short batch (16 distinct random prompts of 32
tokens, 16 tokens out), so arms alternate every 15 decode steps. Time comes from the engine:
each step is timed (wall and this process's CPU time, which a core taken by another process does not
inflate) around vLLM's EngineCore step, and only decode steps of the whole batch count; a run gives its
median step (a step the machine interrupts does not move it). A ratio compares two arms over the rounds: the
mean of one arm's run medians over the other's, with a paired bootstrap interval (stats.py).
The rounds are spread over several builds of the three engines: each build places the weights and expert
granules in memory anew, and two builds of the same engines differ by more than two rounds on one build
do (a 20-adapter arm moved from x1.02 to x1.07 between runs), so the interval resamples builds, then the
rounds within them.

The split times each part of the difference at 20 adapters inside the engines, over rounds of its own in
which three arms alternate (ExpertWeave's mixed batch, ExpertWeave's base requests, the base-only engine): the
reroute op of every MoE layer, the per-step row fill and request accounting; the scheduler, ExpertWeave's
against vLLM's; vLLM's MoE kernel on the same expert ids, ExpertWeave's memfd-backed expert tensors against
the anonymous pages torch allocates (the memory effect of virtual tensors); and the MoE kernel on ExpertWeave's
tensors, the mixed batch's ids against the base requests' (the extra distinct experts a mixed batch touches).
The Python parts are timed by wrapping them, the MoE kernel (called from the compiled graph) by torch's
profiler in runs of their own. Each part is wall time per full-batch decode step (CPU time would overcount
single-threaded Python while torch's threads spin); their sum is checked against the total difference.
Run: .venv/bin/python -m perf.bench_decode [--rounds 96] [--instances 6] [--json FILE]
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from .bench_model import BENCH_CONFIG, build, merged
from .stats import difference_interval, ratio_interval

BATCH = 16
TOKENS = 16
ADAPTER_COUNTS = (1, 5, 10, 20)
PROMPT_TOKENS = 32
SPLIT_ROUNDS = 5  # per engine build


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

    def wrap(self, owner, name: str, part: str, observe=None) -> None:
        """Times owner.name as `part`; observe(args, result), if given, sees each timed call untimed."""
        method, own = getattr(owner, name), name in vars(owner)
        self.seconds[part] = 0.0

        def timed(*args, **kwargs):
            if not self.gate():
                return method(*args, **kwargs)
            started = time.perf_counter()
            result = method(*args, **kwargs)
            self.seconds[part] += time.perf_counter() - started
            if observe is not None:
                observe(args, result)
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


def run(llm, batch: list[dict], names, clock: StepClock) -> list[tuple[float, float]]:
    """One batch; the (wall, CPU) seconds of each of its full-batch decode steps."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True)
    clock.reset()
    if names is None:
        llm.generate(batch, params, use_tqdm=False)
    else:
        llm.generate(batch, params, adapter=names, use_tqdm=False)
    if not clock.steps:
        raise RuntimeError("no decode step ran the whole batch: raise the engine's token budget or seats")
    return list(clock.steps)


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


def measure(rounds: int = 96, eager: bool = False, progress=print, instances: int = 6) -> dict:
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
    if rounds // instances % len(arms):
        raise ValueError(f"{rounds // instances} rounds per engine instance: needs a multiple of the {len(arms)} arms, "
                         "so that every arm runs at every place of a round equally often")
    wall = {arm: [] for arm in arms}
    cpu = {arm: [] for arm in arms}
    per = rounds // instances
    top = f"expertweave, {max(ADAPTER_COUNTS)} adapters"
    split_totals = {}
    shuffle = random.Random(0).shuffle
    for instance in range(instances):
        with Engines(base, adapters, names, eager) as engines:
            for engine, mix in arms.values():  # warm up
                engines.run(engine, mix, batch)
            for order in balanced_orders(list(arms), per, shuffle):
                for arm in order:
                    w, c = zip(*engines.run(*arms[arm], batch))
                    wall[arm].append(statistics.median(w))
                    cpu[arm].append(statistics.median(c))
            for arm, parts in engines.split(batch, arms[top][1], SPLIT_ROUNDS).items():
                split_totals.setdefault(arm, Counter()).update(parts)
            progress(f"decode: engine instance {instance + 1} of {instances} done")
    groups = [r // per for r in range(rounds)]
    comparisons = {"A/A": ("expertweave, base requests (A/A)", "expertweave, base requests"),
                   "fixed cost (base requests)": ("expertweave, base requests", "base-only"),
                   "1 adapter vs its merged model": ("expertweave, 1 adapters", f"merged model of {names[0]}")}
    for k in ADAPTER_COUNTS:
        comparisons[f"{k} adapters, same engine"] = (f"expertweave, {k} adapters", "expertweave, base requests")
        comparisons[f"{k} adapters vs base-only"] = (f"expertweave, {k} adapters", "base-only")
    split = split_parts(split_totals)
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
            "split": {"adapters": max(ADAPTER_COUNTS), "rounds": SPLIT_ROUNDS * instances, **split,
                      "sum_us": sum(split["parts_us"].values()),
                      "total_us": {"difference": 1e6 * total.value, "low": 1e6 * total.low, "high": 1e6 * total.high},
                      "pages": host_pages()}}


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

    def run(self, engine: str, mix, batch: list[dict]) -> list[tuple[float, float]]:
        self.current = self.clocks[engine]
        return run(self.llms[engine], batch, mix, self.current)

    def split(self, batch: list[dict], mix, rounds: int) -> dict:
        """Seconds and steps of each part, in full-batch decode steps of three arms alternating over `rounds`:
        ExpertWeave at this adapter mix, ExpertWeave with base requests, the base-only engine. Timed inside the
        engines: ExpertWeave's per-step work and each engine's scheduler by wrapping them; vLLM's MoE kernel,
        which the compiled graph calls directly, by torch's profiler, in a run of its own (the profiler would
        slow the Python parts)."""
        from torch.profiler import ProfilerActivity, profile

        from expertweave_ascend.integrations.vllm import worker

        arms = {"mixed": ("expertweave", mix), "base requests": ("expertweave", [None] * BATCH),
                "base-only": ("base-only", None)}
        totals = {arm: {"steps": 0, "scheduler": 0.0, "reroute": 0.0, "row_fill": 0.0, "accounting": 0.0,
                        "profiled_steps": 0, "moe": 0.0, "experts_touched": 0, "reroutes": 0} for arm in arms}
        touched = []
        with Stopwatch(lambda: self.current.decoding) as watch:
            watch.wrap(worker._ACTIVE, "reroute", "reroute",
                       observe=lambda args, result: touched.append(result.unique().numel()))
            for part, name in (("row_fill", "on_step"), ("accounting", "on_schedule")):
                watch.wrap(worker._ACTIVE, name, part)
            order = list(arms)
            for r in range(rounds):
                random.Random(r).shuffle(order)
                for arm in order:
                    total = totals[arm]
                    before = dict(watch.seconds)
                    touched.clear()
                    total["steps"] += len(self.run(*arms[arm], batch))
                    total["scheduler"] += self.current.schedule_s
                    for part, seconds in watch.seconds.items():
                        total[part] += seconds - before[part]
                    total["experts_touched"] += sum(touched)
                    total["reroutes"] += len(touched)
                    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiled:
                        total["profiled_steps"] += len(self.run(*arms[arm], batch))
                    total["moe"] += 1e-6 * sum(e.cpu_time_total for e in profiled.events()
                                               if e.name.endswith("cpu_fused_moe") and e.input_shapes
                                               and e.input_shapes[1][0] == BATCH)  # decode steps' calls
        return totals


def split_parts(totals: dict) -> dict:
    """us per decode step of each part of the difference between the mixed arm and the base-only engine."""
    per_step = {arm: {**{k: 1e6 * t[k] / t["steps"] for k in ("scheduler", "reroute", "row_fill", "accounting")},
                      "moe": 1e6 * t["moe"] / t["profiled_steps"]} for arm, t in totals.items()}
    mixed, base, alone = per_step["mixed"], per_step["base requests"], per_step["base-only"]
    parts = {"reroute": mixed["reroute"], "row_fill": mixed["row_fill"], "accounting": mixed["accounting"],
             "scheduler": mixed["scheduler"] - alone["scheduler"],
             "memfd_pages": base["moe"] - alone["moe"],  # the same expert ids, ExpertWeave's pages vs torch's
             "extra_experts": mixed["moe"] - base["moe"]}  # the same pages, the mixed batch's ids vs the base's
    return {"parts_us": parts, "moe_us": {arm: p["moe"] for arm, p in per_step.items()},
            "experts_per_layer": {arm: t["experts_touched"] / t["reroutes"]
                                  for arm, t in totals.items() if t["reroutes"]}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=96)
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
    print("  MoE kernel us per step: " + ", ".join(f"{arm} {us:.0f}" for arm, us in s["moe_us"].items()))
    print("  experts touched per layer and step: " + ", ".join(f"{arm} {n:.1f}" for arm, n in s["experts_per_layer"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
