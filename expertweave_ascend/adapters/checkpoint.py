"""Lazy view of a directory of safetensors files: names, shapes and dtypes from headers, data on demand."""

import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterError
from ..files import directory, os_problem, regular_file

# ESFT has written routed experts both with and without the leading "model." (REFERENCE.md).
EXPERT_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
SHARED_KEY = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.shared_experts\.(gate_proj|up_proj|down_proj)\.weight$")
PROJS = ("gate_proj", "up_proj", "down_proj")

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
}


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


class Checkpoint:
    def __init__(self, path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str]):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata  # the files' safetensors metadata, merged

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        files = [p for p in directory(path) if p.suffix == ".safetensors"]
        if not files:
            raise AdapterError(path, "no .safetensors files")
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for file in files:
            regular_file(file)
            try:
                with safe_open(file, framework="pt") as f:
                    metadata.update(f.metadata() or {})
                    for key in f.keys():
                        view = f.get_slice(key)
                        if key in tensors:
                            raise AdapterError(file, f"tensor {key} also appears in {tensors[key].file.name}",
                                               f"holds a tensor {tensors[key].file.name} holds too")
                        tensors[key] = TensorInfo(file, tuple(view.get_shape()), view.get_dtype())
            except SafetensorError as e:
                raise AdapterError(file, f"not a valid safetensors file ({e})", "not a valid safetensors file") from None
            except OSError as e:
                raise AdapterError(file, f"cannot be read ({os_problem(e)})") from None
        return cls(path, tensors, metadata)

    def expert_keys(self) -> Iterator[tuple[int, int, str, str]]:
        """(layer, expert, proj, key) of every routed-expert tensor, in file order."""
        for key in self.tensors:
            m = EXPERT_KEY.match(key)
            if m:
                yield int(m.group(1)), int(m.group(2)), m.group(3), key

    def dtype(self, key: str) -> str:
        return self.tensors[key].dtype

    @contextmanager
    def reading(self):
        """Yields read(key) -> tensor; each file is opened once and read tensor by tensor."""
        with ExitStack() as stack:
            handles = {}

            def read(key: str) -> torch.Tensor:
                file = self.tensors[key].file
                if file not in handles:
                    handles[file] = stack.enter_context(safe_open(file, framework="pt"))
                try:
                    return handles[file].get_tensor(key)
                except SafetensorError as e:
                    raise AdapterError(file, f"cannot read tensor {key} ({e})", "a tensor cannot be read") from None

            yield read
