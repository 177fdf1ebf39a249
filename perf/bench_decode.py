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

The split times each part of the difference on its own (wall time: the parts are single-threaded Python,
which CPU time would overcount while torch's threads spin), per decode step of 16 tokens at 20 adapters: the
reroute op of every MoE layer and the per-step row fill and request accounting, timed inside the engine;
the scheduler, ExpertWeave's against vLLM's; and, outside the engine on the bench model's MoE layer shapes,
the extra distinct experts a mixed batch touches and the expert tensor's pages (memfd granules against
the anonymous pages torch allocates). The parts add up to a sum the total difference is checked against.
Run: .venv/bin/python -m perf.bench_decode [--rounds 30] [--json FILE]
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


def moe_parts(names: list[str], adapters: dict, repeats: int = 200) -> dict:
    """Microseconds per decode step (all MoE layers) of cpu_fused_moe at the bench shapes on 16 tokens:
    base ids on anonymous pages, the mixed batch's rerouted ids on anonymous pages, and the same on memfd
    granules (ExpertWeave's host backend)."""
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

            def timed(ids_steps, w13_, w2_) -> float:
                out = torch.empty_like(x)
                for step in ids_steps:  # warm
                    cpu_fused_moe(out, x, w13_, w2_, None, None, weights, step, "silu", isa)
                started = time.perf_counter()
                for _ in range(repeats // len(ids_steps)):
                    for step in ids_steps:
                        cpu_fused_moe(out, x, w13_, w2_, None, None, weights, step, "silu", isa)
                return (time.perf_counter() - started) / (repeats // len(ids_steps) * len(ids_steps))

            per_layer[layer] = {
                "base_ids": timed(ids, w13, w2),
                "mixed_ids": timed(rerouted, w13, w2),
                "mixed_ids_memfd": timed(rerouted, mapped["w13"], mapped["w2"]),
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


def measure(rounds: int = 30, eager: bool = False, progress=print) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # both engines here, so their steps can be timed
    from vllm import LLM, envs

    from expertweave_ascend.integrations.vllm import worker
    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    base, adapters = build()
    names = list(adapters)[:max(ADAPTER_COUNTS)]
    batch = prompts(json.loads((base / "config.json").read_text())["vocab_size"])
    engine = dict(max_model_len=512, kv_cache_memory_bytes=256 << 20, enforce_eager=eager)
    base_only = LLM(model=str(base), **engine)
    merged_first = LLM(model=str(merged(base, {names[0]: adapters[names[0]]})[names[0]]), **engine)
    weave = ExpertWeaveLLM(str(base), {n: str(adapters[n]) for n in names}, max_adapters=len(names), **engine)
    try:
        clocks = {"base-only": StepClock(base_only), "merged": StepClock(merged_first),
                  "expertweave": StepClock(weave.llm)}
        arms = {"base-only": (base_only, None, "base-only"),
                f"merged model of {names[0]}": (merged_first, None, "merged"),
                "expertweave, base requests": (weave, [None] * BATCH, "expertweave"),
                "expertweave, base requests (A/A)": (weave, [None] * BATCH, "expertweave")}
        for k in ADAPTER_COUNTS:
            arms[f"expertweave, {k} adapters"] = (weave, [names[i % k] for i in range(BATCH)], "expertweave")
        for llm, mix, clock in arms.values():  # warm up
            run(llm, batch, mix, clocks[clock])
        wall = {arm: [] for arm in arms}
        cpu = {arm: [] for arm in arms}
        order = list(arms)
        shuffle = random.Random(0).shuffle
        for r in range(rounds):
            shuffle(order)
            for arm in order:
                llm, mix, clock = arms[arm]
                w, c = run(llm, batch, mix, clocks[clock])
                wall[arm].append(w)
                cpu[arm].append(c)
            if (r + 1) % 10 == 0:
                progress(f"decode: round {r + 1} of {rounds}")
        top = f"expertweave, {max(ADAPTER_COUNTS)} adapters"
        comparisons = {"A/A": ("expertweave, base requests (A/A)", "expertweave, base requests"),
                       "fixed cost (base requests)": ("expertweave, base requests", "base-only"),
                       "1 adapter vs its merged model": ("expertweave, 1 adapters", f"merged model of {names[0]}")}
        for k in ADAPTER_COUNTS:
            comparisons[f"{k} adapters, same engine"] = (f"expertweave, {k} adapters", "expertweave, base requests")
            comparisons[f"{k} adapters vs base-only"] = (f"expertweave, {k} adapters", "base-only")
        result = {"config": BENCH_CONFIG, "batch": BATCH, "tokens": TOKENS, "rounds": rounds, "eager": eager,
                  "arms": {arm: {"step_ms": 1000 * statistics.fmean(wall[arm]),
                                 "step_cpu_ms": 1000 * statistics.fmean(cpu[arm])} for arm in arms},
                  "ratios": {label: {"cpu": ratio_interval(cpu[a], cpu[b]).to_json(),
                                     "wall": ratio_interval(wall[a], wall[b]).to_json(), "arms": [a, b]}
                             for label, (a, b) in comparisons.items()},
                  "samples": {"wall": wall, "cpu": cpu}}
        # The split, at the top adapter count: in-engine parts over instrumented batches of their own.
        steps = 0
        schedule = {"base-only": 0.0, "expertweave": 0.0}
        with PartClock(worker._ACTIVE) as parts:
            for _ in range(10):
                run(weave, batch, arms[top][1], clocks["expertweave"])
                schedule["expertweave"] += clocks["expertweave"].schedule_s
                steps += TOKENS
                run(base_only, batch, None, clocks["base-only"])
                schedule["base-only"] += clocks["base-only"].schedule_s
        split = {part: 1e6 * s / steps for part, s in parts.seconds.items()}
        split["scheduler"] = 1e6 * (schedule["expertweave"] - schedule["base-only"]) / steps
        moe = moe_parts(names, adapters)
        split["extra_experts"] = moe["extra_experts_us"]
        split["memfd_pages"] = moe["memfd_pages_us"]
        total = difference_interval(wall[top], wall["base-only"])
        result["split"] = {"adapters": max(ADAPTER_COUNTS), "parts_us": split, "sum_us": sum(split.values()),
                           "total_us": {"difference": 1e6 * total.value, "low": 1e6 * total.low,
                                        "high": 1e6 * total.high},
                           "moe_base_us": moe["moe_base_us"],
                           "distinct_experts_per_layer": moe["distinct_experts_per_layer"]}
        return result
    finally:
        weave.shutdown()
        for llm in (base_only, merged_first):
            llm.llm_engine.engine_core.shutdown()
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        envs.disable_envs_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.rounds, args.eager)
    print(f"{'arm':<36}{'step ms':>10}{'CPU ms':>10}")
    for arm, r in result["arms"].items():
        print(f"{arm:<36}{r['step_ms']:>10.2f}{r['step_cpu_ms']:>10.2f}")
    print(f"\n{'comparison':<36}{'CPU time ratio [95% interval]':>34}{'wall':>28}")
    for label, r in result["ratios"].items():
        c, w = r["cpu"], r["wall"]
        print(f"{label:<36}{c['value']:>14.3f} [{c['low']:.3f}, {c['high']:.3f}]"
              f"{w['value']:>14.3f} [{w['low']:.3f}, {w['high']:.3f}]")
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
