"""The ESFT adapter format: expert_cfg.json plus safetensors holding the tuned routed experts, the tuned
shared experts when expert_cfg.json says `"shared_experts": true`, and tuned non-expert tensors (named as
in the base checkpoint: attention, norms, dense layers, embeddings, head) when it says
`"non_expert_modules": true`."""

import hashlib
import json
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from ..errors import AdapterError
from ..files import (MAX_JSON_BYTES, FileIdentity, directory, file_identity, parse_json, read_bytes, read_json,
                     regular_file, shown)
from ..geometry import DTYPE_SIZES
from .checkpoint import EXPERT_KEY, EXPERT_KEY_FORM, IN_EXPERTS, PROJS, SHARED_KEY, Checkpoint, parse_index

CFG_NAME = "expert_cfg.json"
WEIGHTS_NAME = "model.safetensors"
NAME_METADATA = "esft_adapter_name"  # safetensors metadata key
HASHING_AHEAD = 8  # tensors read but not yet hashed, at most (each keeps its memory until hashed)


@dataclass
class EsftAdapter:
    path: Path
    experts: dict[int, tuple[int, ...]]  # MoE layer -> tuned expert ids, as listed (may be empty)
    shared_experts: bool
    non_expert_modules: bool
    keys: dict[tuple[int, int, str], str]  # (layer, expert, proj) -> tensor name
    shared_keys: dict[tuple[int, str], str]  # (layer, proj) -> tensor name of a tuned shared-expert weight
    non_expert_keys: tuple[str, ...]  # tuned non-expert tensors, named as in the base checkpoint
    checkpoint: Checkpoint
    config: dict | None  # the adapter's own config.json, when it ships one
    cfg_bytes: bytes  # expert_cfg.json as read, part of the adapter's identity
    cfg_identity: FileIdentity  # expert_cfg.json's file, taken before it was read

    @property
    def name(self) -> str:
        """The name recorded when the adapter was written (extract --name), else its directory's name."""
        return self.checkpoint.metadata.get(NAME_METADATA) or self.path.name

    @property
    def num_experts(self) -> int:
        return sum(len(ids) for ids in self.experts.values())

    @property
    def shared_layers(self) -> tuple[int, ...]:
        """Layers whose shared experts the adapter tunes."""
        return tuple(sorted({layer for layer, _ in self.shared_keys}))

    @property
    def nbytes(self) -> int:
        total = 0
        for key in (*self.keys.values(), *self.shared_keys.values(), *self.non_expert_keys):
            info = self.checkpoint.tensors[key]
            total += DTYPE_SIZES[info.dtype] * _numel(info.shape)
        return total

    @property
    def dtypes(self) -> set[str]:
        return {self.checkpoint.tensors[k].dtype
                for k in (*self.keys.values(), *self.shared_keys.values(), *self.non_expert_keys)}

    @classmethod
    def open(cls, path: str | Path) -> "EsftAdapter":
        """Reads expert_cfg.json and the safetensors headers (no tensor data) and checks they agree."""
        path = Path(path)
        directory(path)
        cfg_path = path / CFG_NAME
        cfg_identity = file_identity(cfg_path, regular_file(cfg_path))
        cfg_bytes = read_bytes(cfg_path, MAX_JSON_BYTES)
        experts, shared, non_expert = _parse_expert_cfg(parse_json(cfg_path, cfg_bytes), cfg_path)
        checkpoint = Checkpoint.open(path)
        keys: dict[tuple[int, int, str], str] = {}
        shared_keys: dict[tuple[int, str], str] = {}
        non_expert_keys: list[str] = []
        for key, info in checkpoint.tensors.items():
            s = SHARED_KEY.match(key)
            if s:
                if not shared:
                    raise AdapterError(info.file, f"tensor {key} is a shared-expert weight, but {CFG_NAME} "
                                       'says "shared_experts": false',
                                       f'holds a shared-expert weight, but {CFG_NAME} says "shared_experts": false')
                if (int(s.group(1)), s.group(2)) in shared_keys:
                    raise AdapterError(info.file, f"tensor {key} duplicates {shared_keys[int(s.group(1)), s.group(2)]}",
                                       "holds one shared-expert weight twice")
                shared_keys[int(s.group(1)), s.group(2)] = key
                continue
            m = EXPERT_KEY.match(key)
            if not m and IN_EXPERTS.search(key):
                raise AdapterError(info.file, f"tensor {shown(key)} is not an expert weight's name: expected "
                                   f"{EXPERT_KEY_FORM} (or shared_experts in place of experts.<expert>), indices "
                                   "in ASCII digits without sign or leading zeros",
                                   "holds a tensor named like an expert weight, but not as ESFT names them")
            if not m and non_expert:
                non_expert_keys.append(key)
                continue
            if not m:
                raise AdapterError(info.file, f"tensor {shown(key)} is not a routed- or shared-expert weight, and "
                                   f'{CFG_NAME} says "non_expert_modules": false',
                                   "holds a tensor that is not an expert weight")
            layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            if expert not in experts.get(layer, ()):
                raise AdapterError(info.file, f"tensor {key} is for layer {layer} expert {expert}, "
                                   f"which {CFG_NAME} does not list", f"holds an expert {CFG_NAME} does not list")
            if (layer, expert, proj) in keys:
                raise AdapterError(info.file, f"tensor {key} duplicates {keys[layer, expert, proj]}",
                                   "holds one expert weight twice")
            keys[layer, expert, proj] = key
        for layer, ids in experts.items():
            for expert in ids:
                missing = [p for p in PROJS if (layer, expert, p) not in keys]
                if missing:
                    raise AdapterError(path, f"layer {layer} expert {expert} is listed in {CFG_NAME} "
                                       f"but has no {', '.join(missing)} tensor",
                                       f"an expert {CFG_NAME} lists has no weights")
        if shared and not shared_keys:
            raise AdapterError(cfg_path, '"shared_experts" is true but the adapter holds no shared-expert tensor',
                               '"shared_experts" is true but the adapter holds no shared-expert tensor')
        if non_expert and not non_expert_keys:
            raise AdapterError(cfg_path, '"non_expert_modules" is true but the adapter holds no non-expert tensor',
                               '"non_expert_modules" is true but the adapter holds no non-expert tensor')
        for layer in sorted({layer for layer, _ in shared_keys}):
            missing = [p for p in PROJS if (layer, p) not in shared_keys]
            if missing:
                raise AdapterError(path, f"layer {layer}'s shared experts have no {', '.join(missing)} tensor",
                                   "a layer's shared experts miss a weight")
        config_path = path / "config.json"
        config = read_json(config_path) if config_path.exists() else None
        return cls(path, experts, shared, non_expert, keys, shared_keys, tuple(sorted(non_expert_keys)), checkpoint,
                   config, cfg_bytes, cfg_identity)

    def file_of(self, key: str) -> Path:
        return self.checkpoint.tensors[key].file

    @property
    def file_identities(self) -> tuple[FileIdentity, ...]:
        """The identities of every file it is read from, taken before they were read."""
        keys = (*self.keys.values(), *self.shared_keys.values(), *self.non_expert_keys)
        files = {self.file_of(key) for key in keys}
        return tuple(sorted((self.cfg_identity, *(self.checkpoint.identities[f] for f in files))))

    @contextmanager
    def reading(self, checked: dict[str, bytes] | None = None) -> Iterator["AdapterReader"]:
        """Yields an AdapterReader; tensors are read one expert at a time, and hashed on a thread of their own.
        checked: each tensor's digest from an earlier read of files with these file_identities, whose checks
        they passed; the caller confirms the files kept those identities through this read."""
        with self.checkpoint.reading() as read_key, ThreadPoolExecutor(1, "expertweave-hash") as hasher:
            yield AdapterReader(self, read_key, hasher, checked or {})


class AdapterReader:
    """read(layer, expert) -> (gate, up, down), refusing non-finite weights, and hashing what it reads:
    once every tensor was read, sha256() is the adapter's identity, its expert_cfg.json and every tensor
    (name, dtype, shape, bytes); the same bytes under any name or path give the same identity. Each tensor
    is hashed in the memory it is served from, on the hasher's thread while this one reads, checks and
    packs the next (hashlib lets go of the GIL), at most HASHING_AHEAD tensors behind. A tensor whose digest
    is in `checked` is neither hashed nor checked again."""

    def __init__(self, adapter: EsftAdapter, read_key, hasher: ThreadPoolExecutor, checked: dict[str, bytes]):
        self.adapter = adapter
        self.read_key = read_key
        self.hasher = hasher
        self.checked = checked
        self.digests: dict[str, Future] = {}
        self._behind: deque[Future] = deque()  # hashes submitted, perhaps not done: each holds its tensor

    def __call__(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.read_tensor(self.adapter.keys[layer, expert, proj]) for proj in PROJS)

    def shared(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The layer's tuned shared-expert MLP: (gate, up, down)."""
        return tuple(self.read_tensor(self.adapter.shared_keys[layer, proj]) for proj in PROJS)

    def read_tensor(self, key: str) -> torch.Tensor:
        tensor = self.read_key(key)
        if key in self.checked:
            self.digests[key] = Future()
            self.digests[key].set_result(self.checked[key])
            return tensor
        while len(self._behind) >= HASHING_AHEAD:
            self._behind.popleft().result()
        self.digests[key] = self.hasher.submit(_sha256, tensor)
        self._behind.append(self.digests[key])
        if not finite(tensor):
            raise AdapterError(self.adapter.file_of(key), f"tensor {shown(key)} holds NaN or infinite values",
                               "a tensor holds NaN or infinite values")
        return tensor

    def expert_sha256(self, layer: int, expert: int) -> str:
        """One read expert's content identity (its gate, up and down bytes), the same in any adapter."""
        identity = hashlib.sha256()
        for proj in PROJS:
            key = self.adapter.keys[layer, expert, proj]
            info = self.adapter.checkpoint.tensors[key]
            identity.update(f"{proj} {info.dtype} {list(info.shape)} ".encode() + self.digests[key].result())
        return identity.hexdigest()

    def non_expert(self) -> dict[str, torch.Tensor]:
        """The tuned non-expert tensors, by their names in the base checkpoint."""
        return {key: self.read_tensor(key) for key in self.adapter.non_expert_keys}

    def tensor_digests(self) -> dict[str, bytes]:
        """Each tensor read so far, by name: its digest."""
        return {key: digest.result() for key, digest in self.digests.items()}

    def sha256(self) -> str:
        unread = {*self.adapter.keys.values(), *self.adapter.shared_keys.values(),
                  *self.adapter.non_expert_keys} - set(self.digests)
        if unread:
            raise RuntimeError(f"{self.adapter.path}: identity asked before {len(unread)} tensors were read")
        identity = hashlib.sha256(self.adapter.cfg_bytes)
        for key in sorted(self.digests):
            info = self.adapter.checkpoint.tensors[key]
            identity.update(f"\n{key} {info.dtype} {list(info.shape)} ".encode() + self.digests[key].result())
        return identity.hexdigest()


def _sha256(tensor: torch.Tensor) -> bytes:
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).digest()


FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # the dtypes with infinities


def finite(tensor: torch.Tensor) -> bool:
    """Whether no value is NaN or infinite: one reduction, since min and max carry a NaN and show an infinity
    (a tenth of the time of a mask of every element)."""
    if tensor.dtype not in FLOATS or not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def read_expert_cfg(path: str | Path) -> dict[int, tuple[int, ...]]:
    """The tuned experts per layer listed by an expert_cfg.json file."""
    return _parse_expert_cfg(read_json(Path(path)), Path(path))[0]


def _parse_expert_cfg(cfg: dict, cfg_path: Path) -> tuple[dict[int, tuple[int, ...]], bool, bool]:
    raw = cfg.get("experts")
    if not isinstance(raw, dict):
        raise AdapterError(cfg_path, '"experts" must be an object mapping layer index to a list of expert ids')
    experts: dict[int, tuple[int, ...]] = {}
    for layer_key, ids in raw.items():
        layer = parse_index(layer_key)
        if layer is None:
            raise AdapterError(cfg_path, f"layer key {json.dumps(layer_key)} is not a layer index (ASCII digits "
                               "without sign or leading zeros)", "a layer key is not a layer index")
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            raise AdapterError(cfg_path, f'layer "{layer_key}": expected a list of integer expert ids, got {ids!r}',
                               "a layer's experts are not a list of integer expert ids")
        if len(set(ids)) != len(ids):
            raise AdapterError(cfg_path, f'layer "{layer_key}": expert ids repeat in {ids}',
                               "a layer lists an expert twice")
        experts[layer] = tuple(ids)
    flags = []
    for flag in ("shared_experts", "non_expert_modules"):
        value = cfg.get(flag, False)
        if not isinstance(value, bool):
            raise AdapterError(cfg_path, f'"{flag}" must be true or false, got {value!r}',
                               f'"{flag}" must be true or false')
        flags.append(value)
    return dict(sorted(experts.items())), flags[0], flags[1]


def save_adapter(out: str | Path, experts: dict[int, dict[int, tuple[torch.Tensor, ...]]],
                 config: dict | None = None, listed_layers: list[int] | None = None,
                 name: str | None = None, shared: dict[int, tuple[torch.Tensor, ...]] | None = None) -> Path:
    """Writes an ESFT adapter directory: experts[layer][expert] = (gate, up, down); shared[layer] = the
    layer's tuned shared-expert MLP (gate, up, down), which sets "shared_experts": true."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = sorted(set(listed_layers or []) | set(experts))
    cfg = {
        "experts": {str(layer): sorted(experts.get(layer, {})) for layer in layers},
        "shared_experts": bool(shared),
        "non_expert_modules": False,
    }
    tensors = {}
    for layer in sorted(experts):
        for expert in sorted(experts[layer]):
            for proj, weight in zip(PROJS, experts[layer][expert]):
                tensors[f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"] = weight.contiguous()
    for layer, weights in sorted((shared or {}).items()):
        for proj, weight in zip(PROJS, weights):
            tensors[f"model.layers.{layer}.mlp.shared_experts.{proj}.weight"] = weight.contiguous()
    metadata = {"format": "pt", **({NAME_METADATA: name} if name else {})}
    save_file(tensors, out / WEIGHTS_NAME, metadata=metadata)
    (out / CFG_NAME).write_text(json.dumps(cfg) + "\n")
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
