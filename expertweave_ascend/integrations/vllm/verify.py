"""`verify --engine vllm`: the mixed batch through ExpertWeave in vLLM, each row against a vLLM engine
serving that adapter's merged checkpoint (same dtype, same engine settings), the base row against the
base checkpoint served by plain vLLM.

Each oracle engine is given the same batch of prompts and the row of interest is compared. Dense
matmuls on CPU round differently for different batch sizes, and the expert kernel is per-token exact,
so with identical batches every compared row must match bit for bit, not merely within a tolerance.
Identical batches need identical schedules: the engines run in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so every request is queued before the first step instead of
racing a background engine loop."""

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ...adapters import validate_adapter
from ...adapters.merge import write_merged_checkpoint
from ...geometry import BaseGeometry
from ...reports import VerifyReport, VerifyRow
from .engine import shutdown_llm
from .llm import ExpertWeaveLLM


def _run(llm, prompts, params, **kwargs):
    outputs = llm.generate(prompts, params, use_tqdm=False, **kwargs)
    return [(list(o.outputs[0].token_ids), [float(next(iter(step.values())).logprob) if step else 0.0
                                             for step in (o.outputs[0].logprobs or [])],
             o.outputs[0].text) for o in outputs]


@contextmanager
def _in_process_engines():
    key = "VLLM_ENABLE_V1_MULTIPROCESSING"
    before = os.environ.get(key)
    os.environ[key] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[key]
        else:
            os.environ[key] = before


def verify_vllm(base: str | Path, adapters: dict[str, str | Path], prompts: list[str],
                max_new_tokens: int = 32, granularity: int | None = None, consolidate_rel_l2: float | None = None,
                **engine_kwargs) -> VerifyReport:
    from vllm import SamplingParams

    geometry = BaseGeometry.from_checkpoint(base)
    checked = {name: validate_adapter(path, geometry) for name, path in adapters.items()}
    entries = [None, *adapters]
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(entries))]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, ignore_eos=True, logprobs=0)

    with _in_process_engines():
        return _verify(base, adapters, checked, entries, batch_prompts, params, max_new_tokens, granularity,
                       consolidate_rel_l2, engine_kwargs)


def _verify(base, adapters, checked, entries, batch_prompts, params, max_new_tokens, granularity,
            consolidate_rel_l2, engine_kwargs) -> VerifyReport:
    from vllm import LLM
    from vllm.platforms import current_platform

    weave = ExpertWeaveLLM(str(base), {n: str(p) for n, p in adapters.items()}, max_adapters=max(1, len(adapters)),
                           granularity=granularity, consolidate_rel_l2=consolidate_rel_l2, **engine_kwargs)
    try:
        served = _run(weave, batch_prompts, params, adapter=entries)
        memory = weave.memory_report()
    finally:
        weave.shutdown()

    rows = {}
    with tempfile.TemporaryDirectory(prefix="expertweave-merged-") as tmp:
        for i, name in enumerate(entries):
            model = base if name is None else write_merged_checkpoint(base, checked[name], Path(tmp) / name)
            oracle = LLM(model=str(model), **engine_kwargs)
            try:
                want, want_logprobs, _ = _run(oracle, batch_prompts, params)[i]
            finally:
                shutdown_llm(oracle)
            tokens, logprobs, text = served[i]
            same = next((k for k, (a, b) in enumerate(zip(tokens, want)) if a != b), len(want))
            rows[name] = VerifyRow(batch_prompts[i], text, tokens == want,
                                   max((abs(a - b) for a, b in zip(logprobs[:same + 1], want_logprobs)), default=0.0))
    base_row = rows.pop(None)
    return VerifyReport("vllm", "logprobs", current_platform.device_type, str(base), str(engine_kwargs.get("dtype", "auto")),
                        max_new_tokens, base_row, rows, memory, consolidate_rel_l2)
