"""The model the serving benchmarks run: DeepSeek-V2 architecture, DeepSeek-V2-Lite's expert layout
scaled to fit a 2-core CPU, and 100 adapters with real ESFT geometries (20 for the serving benchmarks,
all of them for tiering).

DeepSeek-V2-Lite: hidden 2048, expert intermediate 1408, 64 routed experts top-6 + 2 shared, 26 MoE
layers. Here: hidden 256, expert intermediate 192 (each 1/8 and 3/22 of the real ones), the same 64
routed experts top-6 + 2 shared, 4 MoE layers after one dense layer, MLA attention as the tiny model
has it. Adapter k tunes, in MoE layer j, the experts real adapter esft_data.adapter_geometries(20)[k]
tunes in DeepSeek-V2-Lite's MoE layer j (so 3 to 9 per layer, as the real ones).
Built once into the cache (same seed, same bytes); merged checkpoints are written on demand.
"""

import json
import os
from pathlib import Path

from expertweave_ascend.adapters import EsftAdapter
from expertweave_ascend.adapters.merge import write_merged_checkpoint
from expertweave_ascend.tiny import make_model

from .esft_data import adapter_geometries

BENCH_CONFIG = dict(hidden_size=256, intermediate_size=1024, moe_intermediate_size=192, num_hidden_layers=5,
                    n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2)
ADAPTERS = 20  # what build() returns unless asked for more
BUILT = 100  # what is built: the tiering benchmark's catalogue
MOE_LAYERS = tuple(range(1, BENCH_CONFIG["num_hidden_layers"]))


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "expertweave" / "bench-model"


def build(count: int = ADAPTERS) -> tuple[Path, dict[str, Path]]:
    """(base checkpoint, {adapter name: adapter directory}) of the first count adapters, in order."""
    out = cache_dir()
    layouts = {name: {layer: sorted(ids) for layer, ids in selection.items()}
               for name, selection in adapter_geometries(BUILT, MOE_LAYERS).items()}
    stamp = out / "built.json"
    recipe = {"config": BENCH_CONFIG, "layouts": {n: {str(k): v for k, v in l.items()} for n, l in layouts.items()}}
    if not stamp.exists() or json.loads(stamp.read_text()) != recipe:
        make_model(out, layouts, seed=0, **BENCH_CONFIG)
        stamp.write_text(json.dumps(recipe))
    return out / "base", {name: out / "adapters" / name for name in list(layouts)[:count]}


def merged(base: Path, adapters: dict[str, Path]) -> dict[str, Path]:
    """One merged checkpoint (base with the adapter's experts written over) per adapter."""
    out = {}
    for name, path in adapters.items():
        target = cache_dir() / "merged" / name
        if not (target / "merged.ok").exists():
            write_merged_checkpoint(base, EsftAdapter.open(path), target)
            (target / "merged.ok").touch()
        out[name] = target
    return out
