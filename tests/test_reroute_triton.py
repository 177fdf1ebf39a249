"""The Triton reroute kernel against the torch reference, run by Triton's interpreter on CPU tensors
(and natively on a GPU when there is one)."""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from expertweave_ascend.routing.reroute import reroute_reference, reroute_torch  # noqa: E402


@pytest.fixture(scope="module")
def kernel():
    """reroute_triton, its @triton.jit decorated under TRITON_INTERPRET=1 unless a GPU runs it."""
    saved = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    module = importlib.reload(importlib.import_module("expertweave_ascend.routing.reroute_triton"))
    yield module.reroute_triton
    if saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = saved


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(tokens: int, k: int, rows: int, experts: int, slots: int, seed: int, id_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    topk = torch.randint(0, experts, (tokens, k), generator=g).to(id_dtype)
    token_adapter = torch.randint(0, rows, (tokens,), generator=g, dtype=torch.int32)
    table = torch.randint(0, experts + slots, (rows, experts), generator=g, dtype=torch.int32)
    table[0] = torch.arange(experts, dtype=torch.int32)
    return topk, token_adapter, table


@pytest.mark.parametrize("seed", range(12))
def test_random_cases_equal_the_reference(kernel, seed):
    g = torch.Generator().manual_seed(1000 + seed)
    tokens, k = int(torch.randint(1, 3000, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    rows, experts = int(torch.randint(1, 22, (1,), generator=g)), int(torch.randint(8, 257, (1,), generator=g))
    inputs = case(tokens, k, rows, experts, 120, seed)
    out = kernel(*(t.to(DEVICE) for t in inputs)).cpu()
    assert out.dtype == inputs[0].dtype
    assert torch.equal(out, reroute_torch(*inputs))


@pytest.mark.parametrize("tokens,k", [(0, 6), (1, 1), (1, 6), (170, 6), (171, 6), (1024, 1), (1025, 8)])
def test_edges_equal_the_reference(kernel, tokens, k):
    inputs = case(tokens, k, rows=5, experts=64, slots=40, seed=tokens * 10 + k)
    out = kernel(*(t.to(DEVICE) for t in inputs)).cpu()
    assert out.shape == (tokens, k)
    assert torch.equal(out, reroute_reference(*inputs))


def test_int64_ids_and_non_contiguous_inputs(kernel):
    topk, rows, table = case(300, 6, rows=4, experts=160, slots=64, seed=5, id_dtype=torch.int64)
    wide = torch.zeros(300, 12, dtype=torch.int64)
    wide[:, ::2] = topk
    out = kernel(wide[:, ::2].to(DEVICE), rows.to(DEVICE), table.to(DEVICE)).cpu()
    assert out.dtype == torch.int64 and torch.equal(out, reroute_torch(topk, rows, table))


def test_out_of_range_offsets_are_clamped_into_the_table(kernel):
    table = torch.arange(3 * 8, dtype=torch.int32).view(3, 8) + 100
    topk = torch.tensor([[0, 7], [9, -1], [3, 100]], dtype=torch.int32)
    rows = torch.tensor([2, 2, 5], dtype=torch.int32)
    out = kernel(topk.to(DEVICE), rows.to(DEVICE), table.to(DEVICE)).cpu()
    flat = (rows.long().unsqueeze(1) * 8 + topk.long()).clamp(0, 23)
    assert torch.equal(out, table.reshape(-1)[flat])


def test_row_count_mismatch_is_one_clear_error(kernel):
    topk, rows, table = case(10, 6, rows=3, experts=64, slots=8, seed=1)
    with pytest.raises(ValueError, match="reroute: 9 adapter rows for 10 tokens"):
        kernel(topk, rows[:9], table)
