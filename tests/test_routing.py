"""The reroute op (topk'[t, k] = table[token_adapter[t], topk[t, k]]) and the routing tables."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from expertweave_ascend.errors import CapacityError
from expertweave_ascend.routing import RoutingTables, reroute_reference, reroute_traced

reroute = torch.ops.expertweave.reroute


def random_case(T: int, k: int, M: int, rows: int, ids_dtype, adapter_dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    topk = torch.randint(0, M, (T, k), generator=gen).to(ids_dtype)
    token_adapter = torch.randint(0, rows, (T,), generator=gen).to(adapter_dtype)
    table = torch.randint(0, 4 * M, (rows, M), generator=gen, dtype=torch.int32)  # M + S slots, S = 3M
    return topk, token_adapter, table


def test_reference_on_a_worked_example():
    table = torch.tensor([[0, 1, 2], [5, 1, 7]], dtype=torch.int32)
    topk = torch.tensor([[0, 2], [2, 1], [0, 0]])
    token_adapter = torch.tensor([0, 1, 1])
    expected = torch.tensor([[0, 2], [7, 1], [5, 5]])
    assert torch.equal(reroute_reference(topk, token_adapter, table), expected)
    assert torch.equal(reroute(topk, token_adapter, table), expected)


def traced(topk: torch.Tensor, token_adapter: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """reroute_traced as an engine calls it: the tokens' rows are the first T of a longer per-token buffer."""
    rows = torch.full((topk.shape[0] + 5,), 10**6, dtype=token_adapter.dtype)  # beyond T: never read
    rows[:topk.shape[0]] = token_adapter
    return reroute_traced(topk, rows, table)


IMPLEMENTATIONS = {"op": reroute, "traced": traced}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("ids_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("k", [1, 4, 6])
@pytest.mark.parametrize("M", [16, 64])
def test_reroute_equals_the_reference(implementation, ids_dtype, k, M):
    seed = 0
    for T in (0, 1, 2, 7, 40):
        for rows in (1, 2, 33):
            for adapter_dtype in (torch.int32, torch.int64):
                seed += 1
                topk, token_adapter, table = random_case(T, k, M, rows, ids_dtype, adapter_dtype, seed)
                got = IMPLEMENTATIONS[implementation](topk, token_adapter, table)
                assert got.dtype == ids_dtype and got.shape == (T, k)
                want = reroute_reference(topk, token_adapter, table)
                assert torch.equal(got, want), (T, k, M, rows, adapter_dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reroute_does_not_modify_or_alias_its_inputs(implementation):
    topk, token_adapter, table = random_case(9, 4, 16, 3, torch.int32, torch.int64, 0)
    copies = [t.clone() for t in (topk, token_adapter, table)]
    out = IMPLEMENTATIONS[implementation](topk, token_adapter, table)
    for t, c in zip((topk, token_adapter, table), copies):
        assert torch.equal(t, c)
        assert out.data_ptr() != t.data_ptr()


@pytest.mark.parametrize("T,ids_dtype", [(0, torch.int64), (1, torch.int32), (11, torch.int64)])
def test_opcheck(T, ids_dtype):
    args = random_case(T, 6, 16, 5, ids_dtype, torch.int32, T)
    torch.library.opcheck(reroute.default, args)


def test_fake_tensor_mode_gives_shape_and_dtype():
    with FakeTensorMode():
        topk = torch.empty(7, 6, dtype=torch.int32)
        token_adapter = torch.empty(7, dtype=torch.int64)
        table = torch.empty(33, 64, dtype=torch.int32)
        out = reroute(topk, token_adapter, table)
        assert out.shape == (7, 6) and out.dtype == torch.int32
        with pytest.raises(RuntimeError):
            reroute(topk, torch.empty(5, dtype=torch.int64), table)  # one adapter row per token


def test_meta_tensors():
    out = reroute(torch.empty(3, 4, dtype=torch.int64, device="meta"),
                  torch.empty(3, dtype=torch.int32, device="meta"),
                  torch.empty(2, 16, dtype=torch.int32, device="meta"))
    assert out.device.type == "meta" and out.shape == (3, 4) and out.dtype == torch.int64


def test_reroute_under_torch_compile_fullgraph_sees_in_place_table_updates():
    """A compiled module holding tables.layer(l), as the engines do: no graph break, no baked-in table."""
    tables = RoutingTables([3, 8], num_experts=16, max_adapters=4)

    class Rerouted(torch.nn.Module):
        def __init__(self, table):
            super().__init__()
            self.table = table

        def forward(self, topk, token_adapter):
            return reroute(topk, token_adapter, self.table) * 1

    compiled = torch.compile(Rerouted(tables.layer(8)), fullgraph=True, dynamic=True)
    for T, seed in ((5, 0), (9, 1), (1, 2)):
        topk, token_adapter, _ = random_case(T, 6, 16, 5, torch.int64, torch.int32, seed)
        assert torch.equal(compiled(topk, token_adapter), topk), "a fresh table is the identity"

    row = tables.take_row("law")
    tables.write_row(row, {8: {e: 16 + e for e in range(0, 16, 2)}})  # the even experts move
    topk = torch.arange(60).remainder(16).view(10, 6)
    token_adapter = torch.tensor([0, row] * 5, dtype=torch.int32)
    got = compiled(topk, token_adapter)
    moved = (token_adapter == row).unsqueeze(1) & (topk % 2 == 0)
    assert torch.equal(got, torch.where(moved, topk + 16, topk))


def test_the_traced_reroute_compiles_into_the_graph_and_reads_its_buffers_in_place():
    """As the CPU engine runs it: a closure over the per-token buffer and a layer's table, called after a
    top-k in a compiled forward. The graph holds no op of ours (nothing to call out to), and steps after
    the trace see the rows and the tables as they are written in place."""
    tables = RoutingTables([3, 8], num_experts=16, max_adapters=4)
    token_rows = torch.zeros(64, dtype=torch.int32)
    reroute_layer = lambda ids: reroute_traced(ids, token_rows, tables.layer(8))  # noqa: E731  (as worker.py's)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def forward(logits):
        return reroute_layer(torch.topk(logits, 6, dim=-1).indices)

    compiled = torch.compile(forward, backend=backend, fullgraph=True, dynamic=True)
    logits = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    for T in (7, 9, 3):  # sizes no other dimension has, and not 1, which dynamic shapes specialize
        assert torch.equal(compiled(logits[:T]), torch.topk(logits[:T], 6, dim=-1).indices), "identity tables"
    row = tables.take_row("law")
    tables.write_row(row, {8: {e: 16 + e for e in range(0, 16, 2)}})  # the even experts move
    token_rows[:10] = torch.tensor([0, row] * 5, dtype=torch.int32)
    got = compiled(logits[:10])
    topk = torch.topk(logits[:10], 6, dim=-1).indices
    moved = (token_rows[:10] == row).unsqueeze(1) & (topk % 2 == 0)
    assert torch.equal(got, torch.where(moved, topk + 16, topk))
    assert len(graphs) == 1, "traced again after the tables or rows changed"
    calls = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert not [c for c in calls if "expertweave" in c], calls


# ----------------------------------------------------------------------------------------------
# RoutingTables

def identity(M: int) -> torch.Tensor:
    return torch.arange(M, dtype=torch.int32)


def test_new_tables_are_identity_in_every_row():
    tables = RoutingTables([1, 4, 26], num_experts=8, max_adapters=3)
    assert tables.tensor.shape == (3, 4, 8) and tables.tensor.dtype == torch.int32
    for layer in (1, 4, 26):
        assert tables.layer(layer).shape == (4, 8)
        for row in range(4):
            assert torch.equal(tables.layer(layer)[row], identity(8))


def test_take_row_gives_the_lowest_free_row_and_runs_out():
    tables = RoutingTables([0], num_experts=4, max_adapters=3)
    assert [tables.take_row(name) for name in ("a", "b", "c")] == [1, 2, 3]
    with pytest.raises(CapacityError, match="law: all 3 adapter rows are in use"):
        tables.take_row("law")
    tables.give_back_row(2)
    assert tables.take_row("d") == 2
    tables.give_back_row(3)
    tables.give_back_row(1)
    assert tables.take_row("e") == 1
    assert tables.take_row("f") == 3
    with pytest.raises(CapacityError):
        tables.take_row("g")


def test_no_adapter_rows():
    tables = RoutingTables([0], num_experts=4, max_adapters=0)
    with pytest.raises(CapacityError):
        tables.take_row("law")


def test_write_row_sets_only_that_row_and_those_layers():
    tables = RoutingTables([1, 4, 26], num_experts=8, max_adapters=3)
    row = tables.take_row("law")
    tables.write_row(row, {4: {0: 8, 5: 9}, 26: {7: 10}})
    assert tables.layer(4)[row].tolist() == [8, 1, 2, 3, 4, 9, 6, 7]
    assert tables.layer(26)[row].tolist() == [0, 1, 2, 3, 4, 5, 6, 10]
    assert torch.equal(tables.layer(1)[row], identity(8)), "a layer the adapter does not tune"
    for layer in (1, 4, 26):
        for other in range(4):
            if other != row:
                assert torch.equal(tables.layer(layer)[other], identity(8))

    # writing again replaces the row: experts no longer listed go back to the base
    tables.write_row(row, {4: {2: 11}})
    assert tables.layer(4)[row].tolist() == [0, 1, 11, 3, 4, 5, 6, 7]
    assert tables.layer(26)[row].tolist() == [0, 1, 2, 3, 4, 5, 6, 10], "layers not written stay"


def test_clear_and_give_back_reset_the_row_in_every_layer():
    tables = RoutingTables([1, 4], num_experts=8, max_adapters=2)
    law, math = tables.take_row("law"), tables.take_row("math")
    tables.write_row(law, {1: {3: 8}, 4: {3: 9}})
    tables.write_row(math, {1: {0: 10}, 4: {7: 11}})
    tables.clear_row(law)
    for layer in (1, 4):
        assert torch.equal(tables.layer(layer)[law], identity(8))
    assert tables.layer(1)[math].tolist() == [10, 1, 2, 3, 4, 5, 6, 7], "another row was cleared"
    with pytest.raises(CapacityError):  # clearing a row does not free it
        tables.take_row("code")

    tables.give_back_row(math)
    for layer in (1, 4):
        assert torch.equal(tables.layer(layer)[math], identity(8))
        assert torch.equal(tables.layer(layer)[0], identity(8))
    assert tables.take_row("code") == math


def test_layer_is_a_view_updated_in_place():
    tables = RoutingTables([2, 5], num_experts=8, max_adapters=2)
    held = tables.layer(5)
    held_other = tables.layer(2)
    row = tables.take_row("law")
    tables.write_row(row, {5: {1: 12}})
    assert held[row, 1] == 12
    assert torch.equal(held_other[row], identity(8))
    tables.give_back_row(row)
    assert held[row, 1] == 1
    assert held.data_ptr() == tables.tensor[1].data_ptr()


def test_reroute_through_tables_keeps_base_tokens_on_base_experts():
    tables = RoutingTables([0], num_experts=16, max_adapters=2)
    row = tables.take_row("law")
    tables.write_row(row, {0: {e: 16 + e for e in range(16)}})
    topk = torch.randint(0, 16, (10, 6), dtype=torch.int32)
    token_adapter = torch.tensor([0, row] * 5, dtype=torch.int32)
    out = reroute(topk, token_adapter, tables.layer(0))
    assert torch.equal(out[0::2], topk[0::2])
    assert torch.equal(out[1::2], topk[1::2] + 16)


def test_one_adapter_row_per_token_is_enforced_by_the_kernel():
    topk, _, table = random_case(3, 6, 16, 2, torch.int32, torch.int32, 0)
    for rows in (1, 2):
        with pytest.raises(ValueError, match=f"reroute: {rows} adapter rows for 3 tokens"):
            reroute(topk, torch.zeros(rows, dtype=torch.int32), table)
