"""Loads the Ascend C kernels library, which registers the NPU kernel of expertweave::reroute.

The library is built from ascendc_kernels/ by CMake on an Atlas server (ascendc_kernels/README.md).
It is EXPERTWEAVE_ASCEND_KERNELS if set, else the build directory of a source checkout. Loading it
adds a PrivateUse1 (NPU) kernel to the op that expertweave_ascend.routing.reroute defines; until then
NPU tensors take the op's plain torch kernel.
"""

import os
from pathlib import Path

import torch

from ...errors import ExpertWeaveError

LIBRARY_ENV = "EXPERTWEAVE_ASCEND_KERNELS"
LIBRARY_NAME = "libexpertweave_ascend_ops.so"
DEFAULT_PATH = Path(__file__).resolve().parents[3] / "build" / "ascendc_kernels" / LIBRARY_NAME

_loaded: Path | None = None


class KernelLibraryMissing(ExpertWeaveError, FileNotFoundError):
    """The Ascend C kernels library was not built, or not where it was said to be."""


def library_path() -> Path:
    return Path(os.environ[LIBRARY_ENV]) if LIBRARY_ENV in os.environ else DEFAULT_PATH


def load_kernels() -> Path:
    """Registers the NPU kernels (once per process) and returns the library's path."""
    global _loaded
    if _loaded is None:
        path = library_path()
        if not path.is_file():
            raise KernelLibraryMissing(f"{path}: no Ascend C kernels library; build it as ascendc_kernels/README.md "
                                       f"says, or set {LIBRARY_ENV} to the built {LIBRARY_NAME}")
        # The library links torch_npu and registers for its dispatch key; the op it implements is defined
        # by expertweave_ascend.routing.reroute.
        import torch_npu  # noqa: F401

        from ...routing import reroute  # noqa: F401

        torch.ops.load_library(str(path))
        _loaded = path
    return _loaded
