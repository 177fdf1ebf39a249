"""Adapter hot-load speed against this machine's memory-copy bandwidth.

A real ESFT adapter directory (the law selection, DeepSeek-V2-Lite expert shapes, bf16 random weights)
is loaded through ExpertWeave.load_adapter: validation, slot allocation, granule mapping, safetensors
reads, packing into the transformers layout (w13 = gate rows then up rows, w2 = down) and the copy into
the mapped slots, then unloaded; the median over repeats is taken. The file is in the page cache (just
written), so this is the host-side load path, not the disk. Copy bandwidth: torch copy_ between two
touched buffers of the same size as the adapter. Ratio = adapter bytes per second / copy bytes per second.
Also measured: the same copy into granules freshly mapped from the host backend, the floor a load into
new physical memory has on this machine (each first-touched page is allocated and zeroed by the kernel).
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from expertweave_ascend.adapters import save_adapter
from expertweave_ascend.capacity import DEEPSEEK_V2_LITE
from expertweave_ascend.geometry import BaseGeometry
from expertweave_ascend.memory import HostBackend, WeightSpec
from expertweave_ascend.weave import ExpertWeave, WeaveConfig

from .esft_data import adapter_geometries


class TransformersLayoutLayer:
    """MoELayerHandle for a benchmark without model weights: the transformers expert layout; the base
    slots stay mapped but unwritten, since loading an adapter never touches them."""

    def __init__(self, layer: int, geometry: BaseGeometry):
        self.layer = layer
        h, i = geometry.hidden_size, geometry.moe_intermediate_size
        self.specs = [WeightSpec("w13", (2 * i, h), torch.bfloat16), WeightSpec("w2", (h, i), torch.bfloat16)]

    def weight_specs(self) -> list[WeightSpec]:
        return self.specs

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor) -> None:
        pass

    def pack_expert(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"w13": torch.cat([gate, up], dim=0), "w2": down}


def write_adapter(out: Path, layers: tuple[int, ...], geometry: BaseGeometry) -> Path:
    selection = adapter_geometries(1, layers)["law"]
    g = torch.Generator().manual_seed(0)
    experts = {layer: {e: tuple(torch.randn(geometry.proj_shape(p), generator=g).to(torch.bfloat16)
                                for p in ("gate_proj", "up_proj", "down_proj")) for e in ids}
               for layer, ids in selection.items() if ids}
    return save_adapter(out, experts, config=DEEPSEEK_V2_LITE, listed_layers=list(layers))


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    dst = torch.zeros_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times)


def first_touch_bandwidth(nbytes: int, repeats: int) -> float:
    """Copy into granules mapped just before, from a fresh host backend each time (mapping included)."""
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16)
    times = []
    for _ in range(repeats):
        backend = HostBackend()
        size = -(-nbytes // backend.granularity) * backend.granularity
        address = backend.reserve(size)
        start = time.perf_counter()
        handles = [backend.create_physical(backend.granularity) for _ in range(0, size, backend.granularity)]
        for offset, handle in zip(range(0, size, backend.granularity), handles):
            backend.map(address + offset, backend.granularity, handle)
        backend.tensor(address, (nbytes // 2,), torch.bfloat16).copy_(src)
        times.append(time.perf_counter() - start)
        for offset, handle in zip(range(0, size, backend.granularity), handles):
            backend.unmap(address + offset, backend.granularity)
            backend.free_physical(handle)
        backend.release(address, size)
        backend.close()
    return nbytes / statistics.median(times)


def measure(layers: tuple[int, ...], repeats: int) -> dict:
    geometry = BaseGeometry.from_config(DEEPSEEK_V2_LITE, "BF16")
    with tempfile.TemporaryDirectory(prefix="expertweave-hotload-") as tmp:
        path = write_adapter(Path(tmp) / "law", layers, geometry)
        sub = BaseGeometry(geometry.num_layers, layers, geometry.num_experts, geometry.hidden_size,
                           geometry.moe_intermediate_size, geometry.dtype)
        handles = [TransformersLayoutLayer(layer, geometry) for layer in layers]
        weave = ExpertWeave(sub, handles, WeaveConfig(max_adapters=1, adapter_slots=geometry.num_experts // 4))
        try:
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                loaded = weave.load_adapter("law", path)
                times.append(time.perf_counter() - start)
                weave.unload_adapter("law")
        finally:
            weave.close()
    load_s = statistics.median(times)
    copy = copy_bandwidth(loaded.nbytes, repeats)
    first_touch = first_touch_bandwidth(loaded.nbytes, repeats)
    return {"adapter": "law (real ESFT selection)", "layers": len(layers), "experts": loaded.num_experts,
            "adapter_bytes": loaded.nbytes, "load_s": load_s, "load_bytes_per_s": loaded.nbytes / load_s,
            "copy_bytes_per_s": copy, "first_touch_bytes_per_s": first_touch, "ratio": loaded.nbytes / load_s / copy,
            "repeats": repeats}
