"""Near-duplicate consolidation: adapter expert bytes saved against divergence from the merged models.

The tiny model's adapters are built the way fine-tuning makes them (make-tiny --delta-spread): each tuned
expert is its base expert plus a delta whose relative size is drawn log-uniformly from 0.1% to 100%. For
each threshold X, `verify` (transformers engine) serves every adapter with consolidation at X in one
mixed batch and reports, per adapter, the experts consolidated and the greedy next-token agreement and
mean KL(merged || served) per token on the merged model's own continuations of the prompt set. The
largest threshold consolidates every expert into the base's: its divergence is the adapters' whole effect
on this model, the scale the others are read against.
"""

import statistics
import tempfile
from pathlib import Path

from expertweave_ascend.tiny import make_tiny
from expertweave_ascend.verify import verify_hf

THRESHOLDS = (0.0, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 10.0)  # 10: every expert to the base
SPREAD = (1e-3, 1.0)


def measure(thresholds=THRESHOLDS, adapters: int = 6, max_new_tokens: int = 16, progress=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="expertweave-consolidation-") as tmp:
        paths = make_tiny(Path(tmp), adapters=adapters, seed=0, delta_spread=SPREAD)
        rows = []
        for x in (None, *thresholds):
            progress(f"consolidation: relative L2 <= {x}" if x is not None else "consolidation: off")
            report = verify_hf(Path(tmp) / "base", paths, max_new_tokens=max_new_tokens, granularity=64 << 10,
                               consolidate_rel_l2=x)
            m = report.memory
            served = list(report.adapters.values())
            rows.append({
                "rel_l2": x,
                "experts": sum(a.experts for a in m.adapters.values()),
                "consolidated": sum(len(a.consolidated or ()) for a in m.adapters.values()),
                "adapter_expert_bytes": m.adapter_expert_bytes,
                "slot_bytes": m.slot_bytes,
                "saved_bytes": m.saved_bytes,
                "saved_share": m.saved_bytes / m.adapter_expert_bytes,
                "agreement": statistics.fmean(r.agreement for r in served),
                "min_agreement": min(r.agreement for r in served),
                "mean_kl": statistics.fmean(r.mean_kl for r in served),
                "max_kl": max(r.mean_kl for r in served),
                "outputs_equal": sum(r.tokens_equal for r in served),
            })
    return {"adapters": adapters, "spread": list(SPREAD), "prompts": report.prompts,
            "max_new_tokens": max_new_tokens, "rows": rows}
