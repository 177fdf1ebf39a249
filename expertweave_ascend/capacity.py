"""Memory plan: what serving a set of adapter geometries costs, measured by the real allocator.

It drives ExpertMemory (the same slot allocator, granule refcounts and physical pool ExpertWeave
loads adapters through) over a real host reservation with the model's expert shapes, without
writing any weights, so it runs for full-size models on a laptop: pages are mapped, never touched.
"""

import torch

from .geometry import BaseGeometry
from .memory import ExpertMemory, HostBackend, WeightSpec
from .reports import AdapterMemory, MemoryReport
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
                granularity: int, model_bytes: int | None = None) -> MemoryReport:
    """Loads every adapter's expert counts through ExpertMemory and reports the byte accounting."""
    dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[geometry.dtype]
    h, i = geometry.hidden_size, geometry.moe_intermediate_size
    specs = [WeightSpec("w13", (2 * i, h), dtype), WeightSpec("w2", (h, i), dtype)]
    backend = HostBackend(granularity)
    slots = slots_needed(adapters.values(), geometry.moe_layers)
    memory = ExpertMemory(backend, {layer: specs for layer in geometry.moe_layers}, geometry.num_experts, slots)
    try:
        planned = {}
        for name, experts in adapters.items():
            counts = {layer: len(ids) for layer, ids in experts.items() if ids}
            before = memory.mapped_bytes
            memory.allocate(name, counts)
            planned[name] = AdapterMemory.of(memory, counts, added_mapped_bytes=memory.mapped_bytes - before)
        return MemoryReport.of(memory, planned, slots, model_bytes)
    finally:
        memory.close()
        backend.close()
