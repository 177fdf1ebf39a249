"""Memory plan: what serving a set of adapter geometries costs, measured by the real allocator.

It drives ExpertMemory (the same slot allocator, granule refcounts and physical pool ExpertWeave
loads adapters through) over a real host reservation with the model's expert shapes, without
writing any weights, so it runs for full-size models on a laptop: pages are mapped, never touched.
"""

import torch

from .geometry import BaseGeometry
from .memory import ExpertMemory, HostBackend, WeightSpec
from .weave import slots_needed

# DeepSeek-V2-Lite, the ESFT base (REFERENCE.md).
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": 102400,
    "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_experts_per_tok": 6, "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None,
    "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "topk_method": "greedy", "norm_topk_prob": False, "tie_word_embeddings": False,
}
PRESETS = {"deepseek-v2-lite": DEEPSEEK_V2_LITE}


def model_nbytes_from_config(config: dict, itemsize: int = 2) -> int:
    """All weights of the model the config describes, counted on the meta device (nothing allocated)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    return sum(p.numel() for p in model.parameters()) * itemsize


def plan_memory(geometry: BaseGeometry, adapters: dict[str, dict[int, tuple[int, ...]]],
                granularity: int, model_bytes: int | None = None) -> dict:
    """Loads every adapter's expert counts through ExpertMemory and reports the byte accounting."""
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[geometry.dtype]
    h, i = geometry.hidden_size, geometry.moe_intermediate_size
    specs = [WeightSpec("w13", (2 * i, h), dtype), WeightSpec("w2", (h, i), dtype)]
    backend = HostBackend(granularity)
    memory = ExpertMemory(backend, {layer: specs for layer in geometry.moe_layers}, geometry.num_experts,
                          slots_needed(adapters.values(), geometry.moe_layers))
    try:
        per_adapter = {}
        for name, experts in adapters.items():
            before = memory.mapped_bytes
            memory.allocate(name, {layer: len(ids) for layer, ids in experts.items() if ids})
            per_adapter[name] = {
                "experts": sum(map(len, experts.values())),
                "max_per_layer": max(map(len, experts.values()), default=0),
                "bytes": sum(len(ids) for ids in experts.values()) * geometry.expert_nbytes,
                "added_mapped_bytes": memory.mapped_bytes - before,
            }
        adapter_bytes = sum(a["bytes"] for a in per_adapter.values())
        adapter_mapped = memory.mapped_bytes - memory.base_mapped_bytes
        padded = sum(a["max_per_layer"] for a in per_adapter.values()) * len(geometry.moe_layers) \
            * geometry.expert_nbytes
        return {
            "granularity": granularity,
            "moe_layers": len(geometry.moe_layers),
            "expert_bytes": geometry.expert_nbytes,
            "base_expert_bytes": memory.base_expert_bytes,
            "base_mapped_bytes": memory.base_mapped_bytes,
            "base_allocations": memory.base_allocations,  # physical allocations, one map call each
            "adapter_expert_bytes": adapter_bytes,
            "adapter_mapped_bytes": adapter_mapped,
            "fragmentation": adapter_mapped / adapter_bytes if adapter_bytes else None,
            "padded_bytes": padded,
            "padded_fragmentation": padded / adapter_bytes if adapter_bytes else None,
            "merged_bytes": None if model_bytes is None else model_bytes * len(adapters),
            "adapters": per_adapter,
        }
    finally:
        memory.close()
        backend.close()


def format_plan(plan: dict) -> str:
    gb = 1e9
    lines = [f"{'adapter':<12}{'experts':>8}{'max/layer':>10}{'expert GB':>11}{'+mapped GB':>12}"]
    for name, a in plan["adapters"].items():
        lines.append(f"{name:<12}{a['experts']:>8}{a['max_per_layer']:>10}{a['bytes'] / gb:>11.3f}"
                     f"{a['added_mapped_bytes'] / gb:>12.3f}")
    lines += [
        f"base experts {plan['base_expert_bytes'] / gb:.3f} GB over {plan['moe_layers']} MoE layers "
        f"(mapped {plan['base_mapped_bytes'] / gb:.3f} GB, granule {plan['granularity'] / 2**20:g} MiB, "
        f"{plan['base_allocations']} physical allocations and map calls for "
        f"{plan['base_mapped_bytes'] // plan['granularity']} granules)",
        f"adapters: experts {plan['adapter_expert_bytes'] / gb:.3f} GB, mapped {plan['adapter_mapped_bytes'] / gb:.3f} GB"
        f" -> fragmentation {plan['fragmentation']:.4f}",
        f"padded to E_max: {plan['padded_bytes'] / gb:.3f} GB (fragmentation {plan['padded_fragmentation']:.3f})",
    ]
    if plan["merged_bytes"] is not None:
        lines.append(f"merged copies: {plan['merged_bytes'] / gb:.3f} GB")
    return "\n".join(lines)
