"""vLLM CPU decode throughput: base-only versus ExpertWeave serving the same requests over 1, 5 and 10
adapters, all engines alive in one run and measured in alternating rounds.

Model: DeepSeek-V2-style, 64 routed experts top-6 + 2 shared, like DeepSeek-V2-Lite, with hidden and
expert sizes scaled down to fit a small CPU (see BENCH_CONFIG). Adapters: the real ESFT expert
selections of DeepSeek-V2-Lite (../shared/data/esft/expert_configs; expert ids are used as they are,
both models having 64 experts), the layers of adapter k taken from its task's layers 1 + 4k.. so the ten
adapters differ. Requests are spread over the loaded adapters round robin; the base-only engine runs
the same prompts with no adapter.

Decode throughput = requests x (OUT - 1) new tokens / (time of OUT tokens - time of 1 token), so
prefill is subtracted. Run: .venv/bin/python perf/bench_decode.py [--rounds 3] [--json FILE]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ESFT_CONFIGS = ROOT.parent / "shared" / "data" / "esft" / "expert_configs"
BENCH_CONFIG = dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=192, num_hidden_layers=5,
                    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2)
TASKS = ("law", "intent", "summary")
PROMPTS = [f"the court held that a contract number {i} requires offer acceptance and consideration" for i in range(16)]


def build(out: Path) -> dict[str, Path]:
    from expertweave_ascend.adapters import read_expert_cfg
    from expertweave_ascend.tiny import make_model

    if (out / "adapters").is_dir() and len(list((out / "adapters").iterdir())) == 10:
        return {p.name: p for p in sorted((out / "adapters").iterdir())}
    real = {task: read_expert_cfg(ESFT_CONFIGS / f"{task}.json") for task in TASKS}
    moe_layers = range(1, BENCH_CONFIG["num_hidden_layers"])
    layouts = {}
    for k in range(10):
        task = TASKS[k % 3]
        offset = (4 * k) % 22
        layouts[f"{task}{k}"] = {layer: sorted(real[task].get(layer + offset, ())) for layer in moe_layers}
    return make_model(out, layouts, seed=0, **BENCH_CONFIG)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()

    from vllm import LLM, SamplingParams

    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "expertweave" / "bench-decode"
    adapters = build(cache)
    names = sorted(adapters)
    engine = dict(max_model_len=512, kv_cache_memory_bytes=256 << 20)
    engines = {"base-only": (LLM(model=str(cache / "base"), **engine), None)}
    for n in (1, 5, 10):
        chosen = {name: str(adapters[name]) for name in names[:n]}
        llm = ExpertWeaveLLM(str(cache / "base"), chosen, max_adapters=10, **engine)
        engines[f"{n} adapters"] = (llm, [names[i % n] for i in range(len(PROMPTS))])

    def timed(llm, mix, tokens):
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        if mix is None:
            llm.generate(PROMPTS, params, use_tqdm=False)
        else:
            llm.generate(PROMPTS, params, adapter=mix, use_tqdm=False)
        return time.perf_counter() - start

    for llm, mix in engines.values():  # warm up
        timed(llm, mix, 4)
    samples = {label: [] for label in engines}
    for _ in range(args.rounds):
        for label, (llm, mix) in engines.items():
            decode = timed(llm, mix, args.out_tokens) - timed(llm, mix, 1)
            samples[label].append(len(PROMPTS) * (args.out_tokens - 1) / decode)
    base = statistics.median(samples["base-only"])
    results = {label: {"decode_tokens_per_s": statistics.median(s), "samples": s,
                       "ratio_to_base": statistics.median(s) / base} for label, s in samples.items()}
    print(f"{'engine':<12}{'decode tok/s':>14}{'vs base-only':>14}")
    for label, r in results.items():
        print(f"{label:<12}{r['decode_tokens_per_s']:>14.1f}{r['ratio_to_base']:>14.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": BENCH_CONFIG, "requests": len(PROMPTS),
                                               "out_tokens": args.out_tokens, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
