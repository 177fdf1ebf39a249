"""Contrastive decoding (CoLD): what decoding an adapter against its base costs, per token and in KV blocks.

One ExpertWeave engine (in this process) on the bench model serves the same prompts over 8 adapters, round
robin, as plain adapter requests and as contrastive ones (alpha 0.1, beta 0.5), at 1, 8 and 32 concurrent
requests. Each contrastive request runs beside a hidden base twin, so a step carries twice the rows.
Decode throughput = tokens the client receives after each request's first / (last token time - first token
time), from the engine's per-request timestamps (prefill left out); all requests are admitted together.
The two sides alternate (ABBA) within each round, and the per-token cost ratio (plain tok/s / contrastive
tok/s) is taken within a round and reported as the median over rounds with its quartiles.
KV blocks per request: the most KV blocks the engine held at once while serving one request alone.
Run: .venv/bin/python -m perf.contrastive [--rounds 6] [--json FILE]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from .bench_model import build

CONCURRENCY = (1, 8, 32)
OPTION = {"alpha": 0.1, "beta": 0.5}
ADAPTERS = 8
IDLE_S = 0.5


def prompts(count: int) -> list[str]:
    return [f"the court held that a contract number {i} requires offer acceptance and consideration"
            for i in range(count)]


def decode_rate(llm, count: int, names: list[str], contrastive, out_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=out_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts(count), params, adapter=[names[i % len(names)] for i in range(count)],
                           contrastive=contrastive, use_tqdm=False)
    stats = [o.metrics for o in outputs]
    tokens = sum(s.num_generation_tokens - 1 for s in stats)
    return tokens / (max(s.last_token_ts for s in stats) - min(s.first_token_ts for s in stats))


def peak_blocks(llm, name: str, contrastive, out_tokens: int) -> int:
    """The most KV blocks held at once while the engine serves one request."""
    scheduler = llm.llm.llm_engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool
    held = []
    schedule = scheduler.schedule

    def watched(*args, **kwargs):
        output = schedule(*args, **kwargs)
        held.append(pool.num_gpu_blocks - 1 - pool.get_num_free_blocks())  # block 0 is vLLM's null block
        return output

    scheduler.schedule = watched
    try:
        decode_rate(llm, 1, [name], contrastive, out_tokens)
    finally:
        del scheduler.schedule
    return max(held)


def measure(rounds: int = 6, out_tokens: int = 64, eager: bool = False, kv_cache_bytes: int = 256 << 20,
            progress=print) -> dict:
    # In this process, so that the scheduler's KV blocks can be read; vLLM caches its environment once an
    # engine has started, so the setting is undone for whatever runs after.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import envs

    from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM

    base, adapters = build()
    names = list(adapters)[:ADAPTERS]
    llm = ExpertWeaveLLM(str(base), {n: str(adapters[n]) for n in names}, max_adapters=ADAPTERS,
                         max_model_len=512, kv_cache_memory_bytes=kv_cache_bytes, enforce_eager=eager,
                         max_num_seqs=2 * max(CONCURRENCY), disable_log_stats=False)
    try:
        config = llm.llm.llm_engine.vllm_config
        block_size = config.cache_config.block_size
        blocks = {"plain": peak_blocks(llm, names[0], None, out_tokens),
                  "contrastive": peak_blocks(llm, names[0], OPTION, out_tokens)}
        rows = []
        for count in CONCURRENCY:
            for option in (None, OPTION):  # warm up
                decode_rate(llm, count, names, option, out_tokens)
            samples = {"plain": [], "contrastive": []}
            for r in range(rounds):
                order = ("plain", "contrastive") if r % 2 == 0 else ("contrastive", "plain")
                for side in order:
                    time.sleep(IDLE_S)
                    samples[side].append(decode_rate(llm, count, names, OPTION if side == "contrastive" else None,
                                                     out_tokens))
            ratios = sorted(p / c for p, c in zip(samples["plain"], samples["contrastive"]))
            row = {"concurrency": count, "plain_tokens_per_s": statistics.median(samples["plain"]),
                   "contrastive_tokens_per_s": statistics.median(samples["contrastive"]),
                   "cost_ratio": statistics.median(ratios),
                   "cost_ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios,
                   "samples": samples}
            rows.append(row)
            progress(f"contrastive: {count} concurrent: plain {row['plain_tokens_per_s']:.1f} tok/s, contrastive "
                     f"{row['contrastive_tokens_per_s']:.1f} tok/s, per-token cost x{row['cost_ratio']:.3f}")
    finally:
        llm.shutdown()
        del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        envs.disable_envs_cache()
    return {"adapters": ADAPTERS, "option": OPTION, "rounds": rounds, "out_tokens": out_tokens, "eager": eager,
            "prompt_tokens": len(llm.llm.get_tokenizer().encode(prompts(1)[0])), "block_size": block_size,
            "kv_blocks": blocks, "prefix_caching": config.cache_config.enable_prefix_caching, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out-tokens", type=int, default=64)
    parser.add_argument("--eager", action="store_true", help="no torch.compile")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.rounds, args.out_tokens, args.eager)
    print(f"KV blocks ({result['block_size']} tokens) for one request of {result['prompt_tokens']} + "
          f"{result['out_tokens']} tokens: plain {result['kv_blocks']['plain']}, contrastive "
          f"{result['kv_blocks']['contrastive']}")
    print(f"{'concurrent':>10}{'plain tok/s':>14}{'contrastive':>14}{'cost ratio':>12}{'quartiles':>16}")
    for r in result["rows"]:
        q = r["cost_ratio_quartiles"]
        print(f"{r['concurrency']:>10}{r['plain_tokens_per_s']:>14.1f}{r['contrastive_tokens_per_s']:>14.1f}"
              f"{r['cost_ratio']:>12.3f}{q[0]:>9.3f}..{q[-1]:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
