"""vLLM CPU decode throughput: base-only versus ExpertWeave serving the same requests over 1, 5 and 10
adapters, all engines alive in one run and measured in alternating rounds.

Model and adapters: perf/bench_model.py (DeepSeek-V2-Lite's 64 routed experts top-6 + 2 shared, hidden
and expert sizes scaled down; the first 10 of its 20 adapters with real ESFT geometries). Requests are
spread over the loaded adapters round robin; the base-only engine runs the same prompts with no adapter.

Decode throughput = tokens generated after each request's first / (last token time - first token time),
from the engine's own per-request timestamps (RequestOutput.metrics), so prefill is left out. All 16
requests are admitted together, so every step is a decode step of the whole batch. Each round measures
every engine once, in a shuffled order; a ratio to base-only is taken within a round (this machine's
speed drifts by +-10% over seconds) and the median over rounds is reported, with its quartiles. The
row "10 loaded, base requests" sends every request to the base through the 10-adapter engine: the cost
of the mechanism alone, apart from the extra experts that adapter requests touch.
Run: .venv/bin/python -m perf.bench_decode [--rounds 20] [--json FILE]
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from .bench_model import BENCH_CONFIG, build

# vLLM's workers keep polling their queue for a second after each step; an engine measured right after
# another would share the core with it.
IDLE_S = 1.5
PROMPTS = [f"the court held that a contract number {i} requires offer acceptance and consideration" for i in range(16)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    base, adapters = build()
    names = list(adapters)[:10]
    engine = dict(max_model_len=512, kv_cache_memory_bytes=256 << 20, disable_log_stats=False)
    base_only = LLM(model=str(base), **engine)
    cases = {"base-only": (base_only, None)}
    for n in (1, 5, 10):
        chosen = {name: str(adapters[name]) for name in names[:n]}
        llm = ExpertWeaveLLM(str(base), chosen, max_adapters=10, **engine)
        cases[f"{n} adapters"] = (llm, [names[i % n] for i in range(len(PROMPTS))])
    # The mechanism alone: the 10-adapter engine rerouting every token through row 0 (the base).
    cases["10 loaded, base requests"] = (cases["10 adapters"][0], [None] * len(PROMPTS))

    def decode_rate(llm, mix):
        params = SamplingParams(max_tokens=args.out_tokens, temperature=0.0, ignore_eos=True)
        if mix is None:
            outputs = llm.generate(PROMPTS, params, use_tqdm=False)
        else:
            outputs = llm.generate(PROMPTS, params, adapter=mix, use_tqdm=False)
        stats = [o.metrics for o in outputs]
        tokens = sum(s.num_generation_tokens - 1 for s in stats)
        return tokens / (max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats))

    for llm, mix in cases.values():  # warm up
        decode_rate(llm, mix)
    samples = {label: [] for label in cases}
    order = list(cases)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)
        for label in order:
            time.sleep(IDLE_S)
            samples[label].append(decode_rate(*cases[label]))
    # Ratios are taken within a round, so a slow spell of the machine hits both sides of a ratio.
    results = {}
    for label, s in samples.items():
        ratios = sorted(x / b for x, b in zip(s, samples["base-only"]))
        results[label] = {"decode_tokens_per_s": statistics.median(s), "samples": s,
                          "ratio_to_base": statistics.median(ratios),
                          "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios}
    print(f"{'engine':<26}{'decode tok/s':>14}{'vs base-only':>14}{'quartiles':>16}")
    for label, r in results.items():
        q = r["ratio_quartiles"]
        print(f"{label:<26}{r['decode_tokens_per_s']:>14.1f}{r['ratio_to_base']:>14.3f}"
              f"{q[0]:>9.3f}..{q[-1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": BENCH_CONFIG, "requests": len(PROMPTS),
                                               "out_tokens": args.out_tokens, "rounds": args.rounds,
                                               "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
