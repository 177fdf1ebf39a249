"""The ESFT merged model: the base checkpoint with an adapter's tensors (routed experts, and shared experts
and non-expert tensors where it tunes them) written over the base's.

This is the model an adapter was trained as, and the oracle ExpertWeave's outputs are compared to.
Written shard by shard; files other than safetensors (config, tokenizer) are copied unchanged.
"""

import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import EXPERT_KEY, SHARED_KEY
from .esft import EsftAdapter


def write_merged_checkpoint(base_dir: str | Path, adapter: EsftAdapter, out: str | Path) -> Path:
    base_dir, out = Path(base_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for item in base_dir.iterdir():
        if item.is_file() and item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
    with adapter.reading() as read:
        for shard in sorted(base_dir.glob("*.safetensors")):
            with safe_open(shard, framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
                metadata = f.metadata()
            for key in tensors:
                m = EXPERT_KEY.match(key)
                if m and int(m.group(2)) in adapter.experts.get(int(m.group(1)), ()):
                    gate, up, down = read(int(m.group(1)), int(m.group(2)))
                    tensors[key] = {"gate_proj": gate, "up_proj": up, "down_proj": down}[m.group(3)]
                if key in adapter.non_expert_keys:
                    tensors[key] = read.read_tensor(key)
                s = SHARED_KEY.match(key)
                if s and int(s.group(1)) in adapter.shared_layers:
                    gate, up, down = read.shared(int(s.group(1)))
                    tensors[key] = {"gate_proj": gate, "up_proj": up, "down_proj": down}[s.group(2)]
            save_file(tensors, out / shard.name, metadata=metadata)
    return out
