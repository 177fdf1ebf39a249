"""A directory of safetensors files: names, shapes and dtypes from headers, data on demand.

Tensors are read into memory of their own (never a mapping of the file, which keeps following the file:
an edit in place changes the tensor, a truncation kills the reader with SIGBUS), and each read can feed a
hash with the same bytes as they arrive, so what is hashed is what is served."""

import json
import math
import os
import re
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from ..errors import AdapterError
from ..files import FileIdentity, directory, file_identity, open_regular, os_problem, shown, unique_keys

# Layer and expert indices have one spelling: ASCII digits, no sign, no leading zero (int() would take
# "03", "+3", " 3", "1_2" and "١٢" for numbers, giving one expert several names).
INDEX = r"(0|[1-9][0-9]*)"
PROJ = r"(gate_proj|up_proj|down_proj)"
# ESFT has written routed experts both with and without the leading "model." (REFERENCE.md).
EXPERT_KEY = re.compile(rf"(?:model\.)?layers\.{INDEX}\.mlp\.experts\.{INDEX}\.{PROJ}\.weight\Z")
SHARED_KEY = re.compile(rf"(?:model\.)?layers\.{INDEX}\.mlp\.shared_experts\.{PROJ}\.weight\Z")
# Any name inside a layer's routed or shared experts: one that is neither key above is misspelled.
IN_EXPERTS = re.compile(r"(?:^|\.)mlp\.(?:shared_)?experts\.")
EXPERT_KEY_FORM = "model.layers.<layer>.mlp.experts.<expert>.<gate_proj|up_proj|down_proj>.weight"
PROJS = ("gate_proj", "up_proj", "down_proj")

TORCH_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
    "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own bound
CHUNK_BYTES = 16 << 20  # per read call


def parse_index(text: str) -> int | None:
    """The layer or expert index `text` spells canonically, else None."""
    return int(text) if re.fullmatch(INDEX, text) else None


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    start: int  # where its bytes begin in the file
    nbytes: int


class Checkpoint:
    def __init__(self, path: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str],
                 headers: dict[Path, bytes], identities: dict[Path, FileIdentity]):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata  # the files' safetensors metadata, merged
        self.headers = headers  # each file's header as read: reading() refuses a file whose header changed
        self.identities = identities  # each file's identity, taken before its header was read

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        path = Path(path)
        files = [p for p in directory(path) if p.suffix == ".safetensors"]
        if not files:
            raise AdapterError(path, "no .safetensors files")
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        headers: dict[Path, bytes] = {}
        identities: dict[Path, FileIdentity] = {}
        for file in files:
            try:
                with open_regular(file) as f:
                    info = os.fstat(f.fileno())
                    header, found, file_metadata = _read_header(file, f, info.st_size)
            except OSError as e:
                raise AdapterError(file, f"cannot be read ({os_problem(e)})") from None
            identities[file], headers[file] = file_identity(file, info), header
            metadata.update(file_metadata)
            for key, tensor in found.items():
                if key in tensors:
                    raise AdapterError(file, f"tensor {shown(key)} also appears in {tensors[key].file.name}",
                                       f"holds a tensor {tensors[key].file.name} holds too")
                tensors[key] = tensor
        return cls(path, tensors, metadata, headers, identities)

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
        """Yields read(key) -> tensor in memory of its own. Each file is opened once, and refused if its
        header is no longer the one open() checked."""
        with ExitStack() as stack:
            handles: dict[Path, BinaryIO] = {}

            def read(key: str) -> torch.Tensor:
                info = self.tensors[key]
                try:
                    if info.file not in handles:
                        f = stack.enter_context(open_regular(info.file))
                        if f.read(len(self.headers[info.file])) != self.headers[info.file]:
                            raise AdapterError(info.file, "changed while it was being read: its header is not the "
                                               "one checked")
                        handles[info.file] = f
                    return read_owned(handles[info.file], key, info)
                except OSError as e:
                    raise AdapterError(info.file, f"cannot read tensor {shown(key)} ({os_problem(e)})",
                                       "a tensor cannot be read") from None

            yield read


def read_owned(f: BinaryIO, key: str, info: TensorInfo) -> torch.Tensor:
    """The tensor's bytes read into a tensor of their own."""
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    buffer = memoryview(data.numpy())
    f.seek(info.start)
    done = 0
    while done < info.nbytes:
        count = f.readinto(buffer[done:done + CHUNK_BYTES])
        if not count:
            raise AdapterError(info.file, f"ends inside tensor {shown(key)}: it was cut short while it was being "
                               "read", "ends inside a tensor: it was cut short while it was being read")
        done += count
    return data.view(TORCH_DTYPES[info.dtype]).reshape(info.shape)


def _read_header(file: Path, f: BinaryIO, size: int) -> tuple[bytes, dict[str, TensorInfo], dict[str, str]]:
    """The header's bytes, its tensors and its metadata, checked as the safetensors library checks them:
    every tensor's bytes fit its dtype and shape, and the tensors tile the data after the header exactly."""
    def invalid(reason: str) -> AdapterError:
        return AdapterError(file, f"not a valid safetensors file ({reason})", "not a valid safetensors file")

    prefix = f.read(8)
    length = int.from_bytes(prefix, "little")
    header = prefix + f.read(length) if len(prefix) == 8 and length <= min(MAX_HEADER_BYTES, size - 8) else b""
    if len(header) != 8 + length:
        raise invalid(f"its header length does not fit in its {size} bytes")
    try:
        entries = json.loads(header[8:].decode("utf-8"), object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise invalid(f"its header is not JSON: {e}") from None
    if not isinstance(entries, dict):
        raise invalid("its header is not a JSON object")
    metadata = entries.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise invalid("its __metadata__ is not an object of strings")
    tensors = {}
    for key, entry in entries.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise invalid(f"tensor {shown(key)} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in TORCH_DTYPES:
            raise invalid(f"tensor {shown(key)} has dtype {shown(str(dtype))}, which is not one this reads")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise invalid(f"tensor {shown(key)} has a shape that is not a list of sizes")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]
                or offsets[1] - offsets[0] != math.prod(shape) * TORCH_DTYPES[dtype].itemsize):
            raise invalid(f"tensor {shown(key)}'s data_offsets do not hold its dtype and shape")
        tensors[key] = TensorInfo(file, tuple(shape), dtype, 8 + length + offsets[0], offsets[1] - offsets[0])
    end = 8 + length
    for tensor in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if tensor.start != end:
            raise invalid("its tensors overlap or leave gaps")
        end += tensor.nbytes
    if end != size:
        raise invalid(f"its tensors end at byte {end}, the file at byte {size}")
    return header, tensors, metadata

