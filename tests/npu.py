"""Tests that need torch_npu and an Ascend NPU: marked npu (scripts/validate_atlas.sh selects them) and skipped
where there is none."""

import pytest
import torch


def npu_present() -> bool:
    try:
        import torch_npu  # noqa: F401
    except ImportError:
        return False
    return torch.npu.is_available()


def on_npu(test):
    skip = pytest.mark.skipif(not npu_present(), reason="needs torch_npu and an Ascend NPU (scripts/validate_atlas.sh)")
    return pytest.mark.npu(skip(test))
