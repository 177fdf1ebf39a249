"""Replays a trace against OpenAI-compatible servers with `vllm bench serve`'s own request function and
metric code (vllm.benchmarks), so TTFT, TPOT, ITL, E2EL and throughputs mean exactly what they mean there.

Each request is sent at its arrival time (from the start of the replay) to the server and model name the
caller picks for it: one server for ExpertWeave or the base, one per merged model for merged engines.
"""

import asyncio
import contextlib
import io
import time
from dataclasses import asdict
from typing import Callable

from .workload import Request

PERCENTILES = [50.0, 90.0, 99.0]


async def _replay(trace: list[Request], target: Callable[[Request], tuple[str, str]]) -> tuple[list, float]:
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncInput, async_request_openai_completions

    connector = aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600),
                                     trust_env=True) as session:
        start = time.perf_counter()

        async def send(request: Request):
            await asyncio.sleep(max(0.0, start + request.arrival_s - time.perf_counter()))
            base_url, model = target(request)
            return await async_request_openai_completions(RequestFuncInput(
                prompt=request.prompt, api_url=f"{base_url}/v1/completions", prompt_len=len(request.prompt),
                output_len=request.output_len, model=model, ignore_eos=True), session)

        outputs = await asyncio.gather(*(send(r) for r in trace))
        return outputs, time.perf_counter() - start


def replay(trace: list[Request], target: Callable[[Request], tuple[str, str]]) -> dict:
    """vLLM's BenchmarkMetrics of one replay, as a dict (percentiles as {"p50": ms, ...})."""
    from vllm.benchmarks.datasets import SampleRequest
    from vllm.benchmarks.serve import calculate_metrics

    outputs, duration = asyncio.run(_replay(trace, target))
    failed = [o.error for o in outputs if not o.success]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outputs)} requests failed; first: {failed[0].strip()[-500:]}")
    requests = [SampleRequest(prompt=r.prompt, prompt_len=len(r.prompt), expected_output_len=r.output_len)
                for r in trace]
    with contextlib.redirect_stdout(io.StringIO()):  # its terminal-plot hint
        result, _ = calculate_metrics(requests, outputs, duration, None, PERCENTILES, {})
    out = {}
    for key, value in asdict(result).items():
        if key.startswith("percentiles_"):
            out.update({f"p{p:g}_{key.removeprefix('percentiles_')}": v for p, v in value})
        else:
            out[key] = value
    out["duration_s"] = duration
    return out
