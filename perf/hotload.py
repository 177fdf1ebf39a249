"""Adapter hot-load speed against this machine's memory-copy bandwidth.

A real ESFT adapter directory (the law selection, DeepSeek-V2-Lite expert shapes, bf16 random weights)
is loaded four ways, each the median over repeats (the file is in the page cache, just written, so these
are the host-side paths, not the disk):
  first load       ExpertWeave.load_adapter in a weave that has not read these files: validation, slot
                   allocation and granule mapping, then safetensors reads, the NaN check and content hash of
                   every tensor, each expert packed into the transformers layout (w13 = gate rows then up rows,
                   w2 = down) straight into its slot (no host tier keeps a packed copy here);
  disk -> device   the same in a weave that has read and checked these files before (unchanged since: their
                   digests are reused, packed.CheckedReads); then unloaded, untimed (the unmapping is not
                   part of a load);
  disk -> host     ExpertWeave.pack alone (what a prefetch does), against a plain sequential read of the
                   same files;
  host -> device   prepare + publish of the packed copy the host tier keeps, with the warm-granule budget
                   a server runs with (two adapters' worth): what a reload of an evicted adapter costs.
Copy bandwidth: torch copy_ between two touched buffers of the adapter's size; ratios are bytes per second
over it. Also measured: the copy into granules freshly mapped from the host backend, the floor a load into
new physical memory has here (each first-touched page is allocated and zeroed by the kernel).
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

    def install(self, views: dict[str, torch.Tensor], table: torch.Tensor, shared) -> None:
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


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def median_time(run, repeats: int) -> float:
    return statistics.median(seconds(run) for _ in range(repeats))


def read_files(path: Path) -> None:
    for file in sorted(path.iterdir()):
        with open(file, "rb") as f:
            while f.read(16 << 20):
                pass


def measure(layers: tuple[int, ...], repeats: int) -> dict:
    geometry = BaseGeometry.from_config(DEEPSEEK_V2_LITE, "BF16")
    sub = BaseGeometry(geometry.num_layers, layers, geometry.num_experts, geometry.hidden_size,
                       geometry.moe_intermediate_size, geometry.dtype)
    handles = [TransformersLayoutLayer(layer, geometry) for layer in layers]
    with tempfile.TemporaryDirectory(prefix="expertweave-hotload-") as tmp:
        path = write_adapter(Path(tmp) / "law", layers, geometry)
        config = WeaveConfig(max_adapters=1, adapter_slots=geometry.num_experts // 4)
        first_times = []
        for _ in range(repeats):
            fresh = ExpertWeave(sub, handles, config)
            try:
                first_times.append(seconds(lambda: fresh.load_adapter("law", path)))
            finally:
                fresh.close()
        weave = ExpertWeave(sub, handles, config)
        try:
            loaded = weave.load_adapter("law", path)
            weave.unload_adapter("law")
            load_times = []
            for _ in range(repeats):
                load_times.append(seconds(lambda: weave.load_adapter("law", path)))
                weave.unload_adapter("law")
            load_s = statistics.median(load_times)
        finally:
            weave.close()
        warm = ExpertWeave(sub, handles, WeaveConfig(max_adapters=1, adapter_slots=config.adapter_slots,
                                                     warm_bytes=2 * loaded.nbytes))
        try:
            packed = warm.pack(path)
            pack_s = median_time(lambda: warm.pack(path), repeats)
            read_s = median_time(lambda: read_files(path), repeats)
            warm.publish(warm.prepare("law", packed))  # maps the granules; the unload leaves them warm
            warm.unload_adapter("law")
            copy_times = []
            for _ in range(repeats):
                copy_times.append(seconds(lambda: warm.publish(warm.prepare("law", packed))))
                warm.unload_adapter("law")
            host_s = statistics.median(copy_times)
        finally:
            warm.close()
    copy = copy_bandwidth(loaded.nbytes, repeats)
    first_touch = first_touch_bandwidth(loaded.nbytes, repeats)
    nbytes = loaded.nbytes
    return {"adapter": "law (real ESFT selection)", "layers": len(layers), "experts": loaded.num_experts,
            "adapter_bytes": nbytes, "first_load_s": statistics.median(first_times),
            "first_load_bytes_per_s": nbytes / statistics.median(first_times),
            "load_s": load_s, "load_bytes_per_s": nbytes / load_s, "load_vs_plain_read": read_s / load_s,
            "copy_bytes_per_s": copy, "first_touch_bytes_per_s": first_touch, "ratio": nbytes / load_s / copy,
            "host_to_device_s": host_s, "host_to_device_bytes_per_s": nbytes / host_s,
            "host_to_device_ratio": nbytes / host_s / copy,
            "disk_to_host_s": pack_s, "plain_read_s": read_s, "disk_to_host_vs_plain_read": read_s / pack_s,
            "repeats": repeats}
