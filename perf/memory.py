"""Adapter memory on DeepSeek-V2-Lite shapes, and the KV cache each serving scheme leaves on one device.

Bytes come from the real allocator: capacity.plan_memory loads each adapter geometry through
ExpertMemory (slot allocator, granule refcounts, physical pool) over a host reservation of the full
expert tensors, mapping pages it never touches. Schemes, for N adapters of real ESFT geometries
(esft_data.adapter_geometries):
- ExpertWeave: one base + the granules mapped under the adapters' experts;
- padded: one base + every adapter padded to its largest layer's expert count in every layer;
- ideal: one base + exactly the adapters' expert bytes;
- merged: N full copies of the model, one per engine.
KV capacity on one DEVICE_GIB device: vLLM gives an engine UTILIZATION of the device; weights and an
activation reserve come off that, the rest holds KV at vLLM's MLA page size for DeepSeek-V2-Lite. N
merged engines share the device, each with 1/N of it. Tokens are summed over engines.
"""

import torch

from expertweave_ascend.capacity import DEEPSEEK_V2_LITE, model_nbytes_from_config, plan_memory
from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.memory import DEFAULT_GRANULARITY

from .esft_data import adapter_geometries

DEVICE_GIB = 64
UTILIZATION = 0.9  # vLLM's default gpu_memory_utilization
RESERVE_GIB = 1.0  # activations and runtime per engine (vLLM measures it in a profiling run; assumed here)
GIB = 1 << 30


def kv_bytes_per_token(config: dict) -> int:
    """vLLM's MLA KV page: one latent (kv_lora_rank + qk_rope_head_dim) per token per layer."""
    from vllm.v1.kv_cache_interface import MLAAttentionSpec

    block = 128
    spec = MLAAttentionSpec(block_size=block, num_kv_heads=1,
                            head_size=config["kv_lora_rank"] + config["qk_rope_head_dim"], dtype=torch.bfloat16)
    return spec.page_size_bytes // block * config["num_hidden_layers"]


def kv_tokens(engine_bytes: float, resident_bytes: float, per_token: int) -> int:
    return max(0, int((engine_bytes - resident_bytes - RESERVE_GIB * GIB) // per_token))


def measure(adapter_counts: tuple[int, ...] = (1, 2, 3, 10, 20), granularity: int = DEFAULT_GRANULARITY) -> dict:
    geometry = BaseGeometry.from_config(DEEPSEEK_V2_LITE, "BF16")
    model_bytes = model_nbytes_from_config(DEEPSEEK_V2_LITE)
    per_token = kv_bytes_per_token(DEEPSEEK_V2_LITE)
    device = DEVICE_GIB * GIB * UTILIZATION
    rows = []
    for n in adapter_counts:
        plan = plan_memory(geometry, adapter_geometries(n, geometry.moe_layers), granularity)
        ideal, woven, padded = plan.adapter_expert_bytes, plan.adapter_mapped_bytes, plan.padded_bytes
        rows.append({
            "adapters": n, "expert_count": sum(a.experts for a in plan.adapters.values()),
            "ideal_adapter_bytes": ideal, "expertweave_adapter_bytes": woven, "padded_adapter_bytes": padded,
            "fragmentation": plan.fragmentation, "padded_fragmentation": plan.padded_fragmentation,
            "total_bytes": {"expertweave": model_bytes + woven, "padded": model_bytes + padded,
                            "ideal": model_bytes + ideal, "merged": model_bytes * n},
            "kv_tokens": {"expertweave": kv_tokens(device, model_bytes + woven, per_token),
                          "padded": kv_tokens(device, model_bytes + padded, per_token),
                          "ideal": kv_tokens(device, model_bytes + ideal, per_token),
                          "merged": n * kv_tokens(device / n, model_bytes, per_token)},
        })
    return {"model": "DeepSeek-V2-Lite", "model_bytes": model_bytes, "expert_bytes": geometry.expert_nbytes,
            "moe_layers": len(geometry.moe_layers), "granularity": granularity, "kv_bytes_per_token": per_token,
            "device_gib": DEVICE_GIB, "utilization": UTILIZATION, "reserve_gib_per_engine": RESERVE_GIB,
            "rows": rows}
