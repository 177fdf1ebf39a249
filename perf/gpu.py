"""The GPU benchmarks, on one NVIDIA GPU: `python -m perf.gpu [--quick] [--out perf/results]`.

Writes perf/results/<date>-<gpu>.json and a markdown summary beside it:
- reroute: the Triton reroute kernel against the torch kernel it replaces, and its share of one MoE layer
  at DeepSeek-V2-Lite shapes (router, 64 + S expert slots, top-6, two shared experts, bf16) at 1..256
  tokens. Top-k ids replay the real law routing trace (perf/reroute_share.py's layer), spread over the
  base and three real adapters' rows. The routed experts run through vLLM's Triton `fused_experts` when
  vLLM is installed, else through torch._grouped_mm (the results name which). Timed with
  triton.testing.do_bench (median; the L2 cache is flushed before each run).
- memory: the real ESFT selections (law, intent, summary) loaded through ExpertMemory on CudaBackend at
  DeepSeek-V2-Lite shapes: mapped bytes against the union of granules under occupied slots (I3), the
  driver's free memory against them, every adapter slot holding what was written to it, and the base's
  bytes again after the adapters are released.

Needs no vLLM and no network: on a machine with torch (CUDA), Triton and cuda-bindings, run it from the
repository root with PYTHONPATH=. (scripts/validate_cuda.sh does).
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from expertweave_ascend.capacity import DEEPSEEK_V2_LITE
from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.memory import ExpertMemory, WeightSpec
from expertweave_ascend.routing import reroute
from expertweave_ascend.routing.reroute import reroute_torch
from expertweave_ascend.weave import slots_needed

from .esft_data import TOP_K, adapter_geometries, router_trace
from .reroute_share import EXPERTS, HIDDEN, INTERMEDIATE, SHARED, TRACE_LAYER, adapter_table

FULL_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUICK_TOKENS = (1, 16, 256)


def grouped_experts(x, w13, w2, topk_weights, topk_ids):
    """Routed experts (w13 [E, 2I, H], w2 [E, H, I], SiLU-and-mul) by torch._grouped_mm over the token
    copies sorted by expert: the stand-in for vLLM's fused_experts where vLLM is not installed."""
    tokens, k = topk_ids.shape
    flat = topk_ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    ends = counts.cumsum(0, dtype=torch.int32)
    source = order // k
    gate_up = torch._grouped_mm(x[source], w13.transpose(1, 2), offs=ends)
    gate, up = gate_up.chunk(2, dim=-1)
    hidden = (torch.nn.functional.silu(gate) * up).contiguous()
    out = torch._grouped_mm(hidden, w2.transpose(1, 2), offs=ends)
    out = out * topk_weights.reshape(-1)[order, None].to(out.dtype)
    return torch.zeros_like(x).index_add_(0, source, out)


def experts_kernel():
    """(name, fn(x, w13, w2, topk_weights, topk_ids)) of the routed-experts kernel this machine has."""
    try:
        from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts
    except ImportError:
        return "torch._grouped_mm", grouped_experts
    return "vllm fused_experts (Triton)", fused_experts


class MoeLayer:
    """One DeepSeek-V2-Lite MoE layer on a device: router, routed experts over `slots` slots, shared experts."""

    def __init__(self, slots: int, device: torch.device, experts):
        g = torch.Generator(device=device).manual_seed(0)
        rand = lambda *shape: (torch.randn(*shape, generator=g, device=device) * 0.02).to(torch.bfloat16)  # noqa: E731
        self.experts = experts
        self.gate = rand(EXPERTS, HIDDEN)
        self.w13 = rand(slots, 2 * INTERMEDIATE, HIDDEN)
        self.w2 = rand(slots, HIDDEN, INTERMEDIATE)
        self.shared_up = rand(2 * SHARED * INTERMEDIATE, HIDDEN)
        self.shared_down = rand(HIDDEN, SHARED * INTERMEDIATE)

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(torch.nn.functional.linear(x, self.gate).float(), dim=-1)
        topk_weights, _ = torch.topk(weights, TOP_K, dim=-1)  # the router's own ids are replaced by the trace
        routed = self.experts(x, self.w13, self.w2, topk_weights, topk_ids)
        gate, up = torch.nn.functional.linear(x, self.shared_up).chunk(2, dim=-1)
        return routed + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.shared_down)


def measure_reroute(token_counts, device: torch.device) -> dict:
    from triton.testing import do_bench

    adapters, slots, table = adapter_table(device)
    name, experts = experts_kernel()
    layer = MoeLayer(EXPERTS + slots, device, experts)
    trace = router_trace("law", TRACE_LAYER).to(device)
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, HIDDEN, generator=g, device=device).to(torch.bfloat16)
        topk = trace[:tokens].contiguous()
        token_adapter = (torch.arange(tokens, device=device) % (len(adapters) + 1)).to(torch.int32)
        rerouted = reroute(topk, token_adapter, table)
        assert torch.equal(rerouted, reroute_torch(topk, token_adapter, table)), "Triton and torch kernels differ"
        layer_ms = do_bench(lambda: layer(x, rerouted), return_mode="median")
        triton_ms = do_bench(lambda: reroute(topk, token_adapter, table), return_mode="median")
        torch_ms = do_bench(lambda: reroute_torch(topk, token_adapter, table), return_mode="median")
        rows.append({"tokens": tokens, "moe_layer_us": layer_ms * 1e3, "reroute_triton_us": triton_ms * 1e3,
                     "reroute_torch_us": torch_ms * 1e3, "share": triton_ms / (layer_ms + triton_ms)})
    return {"shape": {"hidden": HIDDEN, "expert_intermediate": INTERMEDIATE, "base_experts": EXPERTS,
                      "adapter_slots": slots, "top_k": TOP_K, "shared_experts": SHARED, "dtype": "bf16",
                      "trace": f"law, layer {TRACE_LAYER}", "adapters": list(adapters)},
            "experts_kernel": name, "rows": rows}


def free_device_bytes(backend) -> int | None:
    return torch.cuda.mem_get_info(backend.device)[0] if backend.device.type == "cuda" else None


def measure_memory(geometry: BaseGeometry, backend, adapters: dict[str, dict[int, tuple[int, ...]]]) -> dict:
    """Loads every adapter's experts through ExpertMemory on backend, writes each slot, checks the bytes."""
    dtype = torch.bfloat16
    h, i = geometry.hidden_size, geometry.moe_intermediate_size
    specs = [WeightSpec("w13", (2 * i, h), dtype), WeightSpec("w2", (h, i), dtype)]
    free_before = free_device_bytes(backend)
    started = time.perf_counter()
    memory = ExpertMemory(backend, {layer: specs for layer in geometry.moe_layers}, geometry.num_experts,
                          slots_needed(adapters.values(), geometry.moe_layers))
    try:
        base_s = time.perf_counter() - started
        free_base = free_device_bytes(backend)
        granularity = backend.granularity
        slots, started = {}, time.perf_counter()
        for name, experts in adapters.items():
            slots[name] = memory.allocate(name, {layer: len(ids) for layer, ids in experts.items() if ids})
        load_s = time.perf_counter() - started
        expected = 0
        for layer in geometry.moe_layers:
            taken = [*range(geometry.num_experts), *(s for owned in slots.values() for s in owned.get(layer, []))]
            for vt in memory.tensors[layer].values():
                touched = {g for s in taken for g in range(s * vt.slot_nbytes // granularity,
                                                           ((s + 1) * vt.slot_nbytes - 1) // granularity + 1)}
                expected += len(touched) * granularity
        for k, owned in enumerate(slots.values(), start=1):
            for layer, layer_slots in owned.items():
                for view in memory.views(layer).values():
                    view[layer_slots] = k
        held = all(bool((view[layer_slots] == k).all())
                   for k, owned in enumerate(slots.values(), start=1) for layer, layer_slots in owned.items()
                   for view in memory.views(layer).values())
        mapped = memory.mapped_bytes
        free_loaded = free_device_bytes(backend)
        adapter_bytes = sum(len(ids) for a in adapters.values() for ids in a.values()) * geometry.expert_nbytes
        for name in adapters:
            memory.release(name)
        free_released = free_device_bytes(backend)
        return {
            "granularity": granularity, "moe_layers": len(geometry.moe_layers), "adapters": list(adapters),
            "base_mapped_bytes": memory.base_mapped_bytes, "adapter_expert_bytes": adapter_bytes,
            "mapped_bytes": mapped, "expected_mapped_bytes": expected, "exact": mapped == expected,
            "fragmentation": (mapped - memory.base_mapped_bytes) / adapter_bytes,
            "slots_hold_their_data": held, "mapped_after_release": memory.mapped_bytes,
            "base_map_s": base_s, "adapter_load_s": load_s,
            "driver_free_drop_base": None if free_before is None else free_before - free_base,
            "driver_free_drop_adapters": None if free_base is None else free_base - free_loaded,
            "driver_free_returned": None if free_loaded is None else free_released - free_loaded,
        }
    finally:
        memory.close()


def markdown(results: dict) -> str:
    gpu, reroute_section, mem = results["gpu"], results["reroute"], results["memory"]
    lines = [f"# GPU benchmarks: {gpu['name']}", "",
             f"`{results['command']}` on {results['date']}: torch {gpu['torch']}, CUDA {gpu['cuda']}, "
             f"Triton {gpu['triton']}, routed experts through {reroute_section['experts_kernel']}.", "",
             "## Reroute: Triton kernel vs torch, share of one DeepSeek-V2-Lite MoE layer", "",
             "| tokens | MoE layer (us) | reroute Triton (us) | reroute torch (us) | share |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['tokens']} | {r['moe_layer_us']:.1f} | {r['reroute_triton_us']:.2f} | "
              f"{r['reroute_torch_us']:.2f} | {r['share']:.2%} |" for r in reroute_section["rows"]]
    gb = 1e9
    lines += ["", "## Memory: real ESFT selections on CUDA virtual memory", "",
              f"Adapters {', '.join(mem['adapters'])}, {mem['moe_layers']} MoE layers, granule "
              f"{mem['granularity'] >> 20} MiB: base {mem['base_mapped_bytes'] / gb:.3f} GB mapped in "
              f"{mem['base_map_s']:.2f} s; adapter experts {mem['adapter_expert_bytes'] / gb:.3f} GB mapped as "
              f"{(mem['mapped_bytes'] - mem['base_mapped_bytes']) / gb:.3f} GB in {mem['adapter_load_s']:.2f} s "
              f"(fragmentation {mem['fragmentation']:.4f}); mapped bytes equal the granules under occupied "
              f"slots: {mem['exact']}; every slot holds its data: {mem['slots_hold_their_data']}; after "
              f"release {mem['mapped_after_release'] / gb:.3f} GB mapped.", ""]
    if mem["driver_free_drop_adapters"] is not None:
        lines += [f"Driver free memory: base {mem['driver_free_drop_base'] / gb:.3f} GB, adapters "
                  f"{mem['driver_free_drop_adapters'] / gb:.3f} GB, returned on release "
                  f"{mem['driver_free_returned'] / gb:.3f} GB.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"token counts {QUICK_TOKENS} only")
    parser.add_argument("--out", type=Path, default=Path("perf/results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: python -m perf.gpu needs an NVIDIA GPU and a CUDA build of torch", file=sys.stderr)
        return 2
    import triton

    from expertweave_ascend.memory.cuda_backend import CudaBackend

    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    results = {"command": "python -m perf.gpu" + (" --quick" if args.quick else ""),
               "date": datetime.date.today().isoformat(),
               "gpu": {"name": name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "triton": triton.__version__}}
    print("reroute ...", file=sys.stderr)
    results["reroute"] = measure_reroute(QUICK_TOKENS if args.quick else FULL_TOKENS, device)
    print("memory ...", file=sys.stderr)
    geometry = BaseGeometry.from_config(DEEPSEEK_V2_LITE, "BF16")
    backend = CudaBackend(device.index)
    try:
        results["memory"] = measure_memory(geometry, backend, adapter_geometries(3, geometry.moe_layers))
    finally:
        backend.close()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date']}-{'-'.join(name.lower().split())}" + ("-quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(results) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
