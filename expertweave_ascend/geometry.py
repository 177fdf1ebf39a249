"""What ExpertWeave needs to know about a base MoE model, read from its checkpoint directory."""

from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import AdapterError
from .files import read_json


@dataclass(frozen=True)
class BaseGeometry:
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    hidden_size: int
    moe_intermediate_size: int
    dtype: str  # safetensors dtype name of the base experts, e.g. "BF16"
    shared_intermediate_size: int = 0  # of each MoE layer's shared-expert MLP (n_shared_experts * I); 0: none
    # every other tensor of the base checkpoint: name -> (shape, dtype); None when built from a config alone
    non_expert: dict[str, tuple[tuple[int, ...], str]] | None = field(default=None, compare=False, repr=False)

    @property
    def expert_nbytes(self) -> int:
        itemsize = DTYPE_SIZES[self.dtype]
        return 3 * self.hidden_size * self.moe_intermediate_size * itemsize

    def proj_shape(self, proj: str) -> tuple[int, int]:
        if proj == "down_proj":
            return (self.hidden_size, self.moe_intermediate_size)
        return (self.moe_intermediate_size, self.hidden_size)

    def shared_proj_shape(self, proj: str) -> tuple[int, int]:
        if proj == "down_proj":
            return (self.hidden_size, self.shared_intermediate_size)
        return (self.shared_intermediate_size, self.hidden_size)

    @classmethod
    def from_config(cls, config: dict, dtype: str, source: str = "config.json") -> "BaseGeometry":
        try:
            num_layers = int(config["num_hidden_layers"])
            num_experts = int(config["n_routed_experts"])
            first_dense = int(config.get("first_k_dense_replace", 0))
            freq = int(config.get("moe_layer_freq", 1))
            hidden = int(config["hidden_size"])
            inter = int(config["moe_intermediate_size"])
            shared = int(config.get("n_shared_experts") or 0) * inter
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterError(source, f"not a DeepSeek-V2 style MoE config ({e!r} missing or invalid)",
                               "not a DeepSeek-V2 style MoE config") from None
        moe_layers = tuple(i for i in range(num_layers) if i >= first_dense and i % freq == 0)
        return cls(num_layers, moe_layers, num_experts, hidden, inter, dtype, shared)

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> "BaseGeometry":
        from .adapters.checkpoint import Checkpoint

        path = Path(path)
        config = read_json(path / "config.json")
        ckpt = Checkpoint.open(path)
        dtype = None
        for layer, expert, proj, key in ckpt.expert_keys():
            dtype = ckpt.dtype(key)
            break
        if dtype is None:
            raise AdapterError(path, "no routed-expert tensors found; is this a DeepSeek-V2 MoE checkpoint?")
        from .adapters.checkpoint import EXPERT_KEY, SHARED_KEY

        geometry = cls.from_config(config, dtype, str(path / "config.json"))
        non_expert = {key: (info.shape, info.dtype) for key, info in ckpt.tensors.items()
                      if not EXPERT_KEY.match(key) and not SHARED_KEY.match(key)}
        return replace(geometry, non_expert=non_expert)


# Every dtype name the safetensors format defines, with its size in bytes.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
