"""The Ascend path of the vLLM plugin, without an NPU.

Every vllm-ascend and torch_npu name the plugin (and scripts/reroute_share.py) hooks, calls or relies on
comes from the tables of tests/vllm_ascend_facts.py; each is checked here against the pinned releases' sources, parsed
with ast and never imported: vllm-ascend 0.23.0.post1's source release and the torch-npu 2.10.0.post4
wheel (tests/pinned.py). The pure-Python parts of the path (expert packing, token layout) run on CPU
tensors against values worked out by hand.
"""

import ast
from types import SimpleNamespace
import re
from pathlib import Path

import pytest
import torch

import pinned
import vllm_ascend_facts
from source_facts import (Fact, Hook, NpuOp, dotted, fact_holds, find, hook_problem, imports, parameters, pinned_tree,
                          torch_npu_bytes, torch_npu_text)
from vllm_ascend_facts import FACTS, HOOKS, MOE_APPLY, MOE_LAYER, TORCH_NPU_OPS
from expertweave_ascend.errors import ExpertWeaveError
from expertweave_ascend.memory import acl_backend
from expertweave_ascend.integrations.vllm.platforms import ascend
from expertweave_ascend.integrations.vllm.platforms.ascend import (MoETokenLayout, VllmAscend, assemble_rows,
                                                                   check_options, rank_rows, shard_transposed)
from expertweave_ascend.routing import reroute

ROOT = Path(__file__).resolve().parents[1]


def npu_op_signature(op: NpuOp) -> list[str] | None:
    """The parameter names torch-npu declares for op, or None if it declares no such op."""
    if op.schema == "meta":
        tree = ast.parse(torch_npu_text("torch_npu/op_plugin/meta/_meta_registrations.py"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any(
                    isinstance(d, ast.Call) and len(d.args) == 2 and isinstance(d.args[1], ast.Constant)
                    and d.args[1].value == op.name for d in node.decorator_list):
                return parameters(node)
        return None
    if op.schema == "native":
        text = torch_npu_text("torch_npu/csrc/aten/npu_native_functions.yaml")
        match = re.search(rf"func:\s*{re.escape(op.name)}\((.*)\)\s*->", text)
        if match is None:
            return None
        return [part.split("=")[0].split()[-1] for part in match.group(1).split(",") if part.strip() != "*"]
    if op.schema.startswith("python:"):
        tree = ast.parse(torch_npu_text(op.schema.removeprefix("python:")))
        node = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == op.name.split(".")[-1]), None)
        return None if node is None else parameters(node)
    if op.schema == "binding":  # a method of torch_npu._C, registered by name in torch_npu's C++ library
        found = b"\0" + op.name.removeprefix("_C.").encode() + b"\0" in torch_npu_bytes("torch_npu/lib/libtorch_npu.so")
        return [] if found else None
    raise AssertionError(f"unknown schema {op.schema!r}")


def in_order(wanted: tuple[str, ...], found: list[str]) -> bool:
    position = 0
    for name in wanted:
        if name not in found[position:]:
            return False
        position = found.index(name, position) + 1
    return True


# -- names and signatures -----------------------------------------------------------------------------
@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.qualname)
def test_each_hook_exists_with_its_parameters(hook):
    assert hook_problem(hook) is None, hook_problem(hook)


def test_every_name_the_platform_class_looks_up_is_a_checked_hook():
    """VllmAscend's targets ("module:qualname") and runner method names are all in HOOKS."""
    checked = {hook.target for hook in HOOKS}
    targets = {value for name, value in vars(VllmAscend).items()
               if name.isupper() and isinstance(value, str) and ":" in value}
    methods = {f"{VllmAscend.MODEL_RUNNER}.{getattr(VllmAscend, name)}"
               for name in ("LOAD_MODEL", "EXECUTE_MODEL", "PREPARE_INPUTS", "GET_MODEL")}
    assert len(targets) >= 7 and (targets - {VllmAscend.MODEL_RUNNER}) | methods <= checked
    assert VllmAscend.MODEL_RUNNER in {hook.target.rsplit(".", 1)[0] for hook in HOOKS}


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f"{f.qualname}-{f.kind}-{f.name}")
def test_each_assumption_about_vllm_ascend_holds(fact):
    assert fact_holds(fact), f"{fact.file}: {fact.qualname} no longer {fact.kind} {fact.name} {fact.keywords or ''}"


@pytest.mark.parametrize("op", TORCH_NPU_OPS, ids=lambda o: o.name)
def test_each_torch_npu_name_exists_with_its_parameters(op):
    found = npu_op_signature(op)
    assert found is not None, f"torch-npu {pinned.pin('torch-npu')} declares no {op.name} ({op.schema})"
    assert in_order(op.params, found), f"torch_npu.{op.name}{tuple(found)} lacks {op.params} in that order"


def torch_npu_references() -> dict[str, set[str]]:
    """Every torch_npu name the plugin and the scripts use, as a path under torch_npu, by file."""
    found: dict[str, set[str]] = {}
    for path in [Path(ascend.__file__), Path(acl_backend.__file__), *sorted((ROOT / "scripts").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        calls = [dotted(n.func) or "" for n in ast.walk(tree) if isinstance(n, ast.Call)]
        found[path.name] = {c.removeprefix("torch_npu.") for c in calls if c.startswith("torch_npu.")} | \
            {c.removeprefix("torch.") for c in calls if c.startswith("torch.npu.")}
    for path in sorted((ROOT / "scripts").glob("*.sh")):
        found[path.name] = set(re.findall(r"\btorch_npu\.([\w.]*\w)", path.read_text()))
    return found


def test_every_torch_npu_name_the_plugin_and_scripts_use_is_in_the_table():
    listed = {op.name for op in TORCH_NPU_OPS}
    references = torch_npu_references()
    assert references["ascend.py"] and references["reroute_share.py"] and references["profile_msprof.sh"]
    assert {"npu.set_device", "npu.synchronize"} <= references["acl_backend.py"]
    for file, names in references.items():
        unlisted = {n for n in names if n not in listed and not any(op.startswith(n + ".") for op in listed)}
        assert not unlisted, f"{file} uses torch_npu names missing from vllm_ascend_facts.TORCH_NPU_OPS: {unlisted}"


def test_the_checks_catch_a_changed_signature_and_a_missing_name():
    swapped = Hook(f"{VllmAscend.MODEL_RUNNER}._prepare_inputs", ("self", "num_scheduled_tokens", "scheduler_output"))
    assert "does not start with" in hook_problem(swapped)
    misspelt = Hook(f"{VllmAscend.MODEL_RUNNER}._prepare_input", ("self",))
    assert "no NPUModelRunner._prepare_input" in hook_problem(misspelt)
    assert not fact_holds(Fact(vllm_ascend_facts._DISPATCH, "TokenDispatcherWithAllGather.token_dispatch", "calls",
                               "DeviceOperator.npu_moe_init_routing", ("expert_count",)))
    routing = next(op for op in TORCH_NPU_OPS if op.name == "npu_moe_init_routing_v2")
    assert not in_order(("expert_num", "expert_idx"), npu_op_signature(routing))
    assert npu_op_signature(NpuOp("npu_moe_init_routing_v9", (), "meta", "")) is None
    assert npu_op_signature(NpuOp("_C._construct_storage_from_data_pointers", (), "binding", "")) is None


def test_rerouting_comes_before_the_eplb_map_and_dispatch():
    """apply selects, then hands the ids to the comm method, which applies log2phy before dispatching."""
    apply = find(pinned_tree(MOE_APPLY.file), MOE_APPLY.qualname)
    calls = {dotted(n.func): n.lineno for n in ast.walk(apply) if isinstance(n, ast.Call)}
    assert calls["select_experts"] < calls["moe_comm_method.fused_experts"]
    fused = find(pinned_tree("vllm_ascend/ops/fused_moe/moe_comm_method.py"), "MoECommMethod.fused_experts")
    lines = {dotted(n.func) or "": n.lineno for n in ast.walk(fused) if isinstance(n, ast.Call)}
    log2phy = min(n.lineno for n in ast.walk(fused) if isinstance(n, ast.Subscript)
                  and dotted(n.value) == "fused_experts_input.routing.log2phy")
    assert log2phy < lines["self.token_dispatcher.token_dispatch"]


def test_vllm_023_takes_the_moe_layer_from_its_legacy_module():
    tree = pinned_tree(MOE_APPLY.file)
    branches = [ast.Module(body=n.body, type_ignores=[]) for n in ast.walk(tree)
                if isinstance(n, ast.If) and ast.unparse(n.test) == "vllm_version_is('0.23.0')"]
    assert any(imports(b, "vllm_ascend.ops.fused_moe.fused_moe_0_23_0", "AscendFusedMoE") for b in branches)


def test_the_moe_layer_registers_under_its_name_as_vllms_fused_moe_does():
    """ExpertWeave's ops reach a woven layer as no_compile_layers[layer_name] (vLLM's FusedMoE.__init__,
    run on vLLM 0.23 by tests/vllm023, registers it there): AscendFusedMoE runs that __init__."""
    init = find(pinned_tree(MOE_LAYER.file), "AscendFusedMoE.__init__")
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "__init__"
               and isinstance(n.func.value, ast.Call) and dotted(n.func.value.func) == "super" for n in ast.walk(init))
    layer = find(pinned_tree(MOE_LAYER.file), "AscendFusedMoE")
    assert [dotted(base) for base in layer.bases] == ["FusedMoE"]


def test_constants_match_the_headers_and_sources():
    header = (pinned.acl_include_dir() / "acl" / "acl_base_rt.h").read_text()
    assert re.search(rf"\bACL_FORMAT_ND = {ascend.ACL_FORMAT_ND},", header)
    utils = pinned_tree("vllm_ascend/utils.py")
    nz = next(n for n in utils.body if isinstance(n, ast.Assign) and dotted(n.targets[0]) == "ACL_FORMAT_FRACTAL_NZ")
    assert re.search(rf"\bACL_FORMAT_FRACTAL_NZ = {ast.literal_eval(nz.value)},", header)
    platform = find(pinned_tree("vllm_ascend/platform.py"), "NPUPlatform")
    device_type = next(n for n in platform.body if isinstance(n, ast.AnnAssign) and dotted(n.target) == "device_type")
    assert ast.literal_eval(device_type.value) == VllmAscend.DEVICE_TYPE


# -- expert packing: one TP rank's transposed shard ---------------------------------------------------
def expert(inter: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gate = torch.arange(inter * hidden, dtype=torch.float32).view(inter, hidden)
    return gate, 1000 + gate, -torch.arange(hidden * inter, dtype=torch.float32).view(hidden, inter)


def test_shard_transposed_is_the_whole_expert_transposed_on_one_rank():
    gate, up, down = expert(4, 3)
    w13, w2 = shard_transposed(torch.cat([gate, up]), down, 0, 1)
    assert w13.shape == (3, 8) and w2.shape == (4, 3)
    assert torch.equal(w13[:, :4], gate.t()) and torch.equal(w13[:, 4:], up.t())
    assert torch.equal(w2, down.t())
    assert w13.is_contiguous() and w2.is_contiguous()


def test_shard_transposed_takes_each_ranks_rows_of_gate_and_up_and_columns_of_down():
    gate, up, down = expert(4, 3)
    w13, w2 = shard_transposed(torch.cat([gate, up]), down, 1, 2)
    # vLLM loads gate rows 2..3 into the first half of rank 1's w13, up rows 2..3 into the second;
    # vllm-ascend then transposes [2I/tp, H] to [H, 2I/tp]; down keeps columns 2..3, transposed.
    assert torch.equal(w13, torch.tensor([[6., 9., 1006., 1009.], [7., 10., 1007., 1010.], [8., 11., 1008., 1011.]]))
    assert torch.equal(w2, torch.tensor([[-2., -6., -10.], [-3., -7., -11.]]))


def test_shard_transposed_refuses_an_intermediate_size_the_ranks_cannot_share():
    gate, up, down = expert(6, 3)
    with pytest.raises(ExpertWeaveError, match="cannot be split over 4 tensor-parallel ranks"):
        shard_transposed(torch.cat([gate, up]), down, 0, 4)


# -- each token's adapter row through DP padding, gathering and SP unpadding -------------------------
def layer_rows(per_rank: list[list[int]], layout: MoETokenLayout, buffer: int = 8) -> torch.Tensor:
    """What every DP rank computes: each rank's persistent per-token buffer (its tokens' rows, then
    zeros), its contribution, the all-gather in rank order, and the assembly."""
    contributions = []
    for rows in per_rank:
        local = torch.zeros(buffer, dtype=torch.int32)
        local[: len(rows)] = torch.tensor(rows, dtype=torch.int32)
        contributions.append(rank_rows(local, layout))
    return assemble_rows(torch.cat(contributions), layout)


def test_one_dp_rank_keeps_its_own_tokens_and_pads_beyond_its_buffer_with_the_base():
    assert layer_rows([[2, 2, 1]], MoETokenLayout(5)).tolist() == [2, 2, 1, 0, 0]
    assert layer_rows([[2, 2, 1]], MoETokenLayout(10)).tolist() == [2, 2, 1] + [0] * 7
    assert layer_rows([[2, 2, 1]], MoETokenLayout(2)).tolist() == [2, 2]


def test_without_sp_each_dp_rank_is_padded_to_the_largest_and_gathered_in_rank_order():
    # prepare pads rank 0's 3 tokens and rank 1's 1 token to max_tokens_across_dp = 3, then all-gathers.
    rows = layer_rows([[1, 1, 2], [3]], MoETokenLayout(3, 2))
    assert rows.tolist() == [1, 1, 2, 3, 0, 0]


def test_with_sp_each_dp_rank_keeps_its_real_tokens_after_the_gather():
    # maybe_all_gather_and_maybe_unpad: blocks of padded_length = 4, cut to num_tokens_across_dp = (3, 1).
    rows = layer_rows([[1, 1, 2], [3]], MoETokenLayout(4, 2, (3, 1)))
    assert rows.tolist() == [1, 1, 2, 3]
    rows = layer_rows([[1], [2, 2], [3, 3, 3]], MoETokenLayout(4, 3, (1, 2, 3)))
    assert rows.tolist() == [1, 2, 2, 3, 3, 3]


def test_gathered_rows_reroute_every_token_to_its_own_adapters_slots():
    table = torch.arange(4, dtype=torch.int32).repeat(3, 1)
    table[1, 2], table[2, 2] = 4, 5  # adapter rows 1 and 2 both tuned expert 2, into slots 4 and 5
    rows = layer_rows([[1, 0], [2]], MoETokenLayout(2, 2))
    topk = torch.tensor([[2, 0], [2, 1], [2, 3], [2, 0]], dtype=torch.int32)
    assert reroute(topk, rows, table).tolist() == [[4, 0], [2, 1], [5, 3], [2, 0]]


# -- the select_experts rebinding ----------------------------------------------------------------------
def test_rebound_select_experts_reroutes_only_inside_a_woven_layer():
    def select_experts(hidden_states, router_logits, top_k):
        return router_logits.topk(top_k).values, router_logits.topk(top_k).indices.to(torch.int32)

    rebound = ascend.rerouted_select(select_experts)
    logits = torch.tensor([[0.1, 0.9, 0.5, 0.2]])
    assert rebound(None, logits, 2)[1].tolist() == [[1, 2]]
    with ascend.rerouting(lambda ids: ids + 4):
        weights, ids = rebound(None, logits, 2)
        with ascend.rerouting(lambda ids: ids + 8):
            assert rebound(None, logits, 2)[1].tolist() == [[9, 10]]
        assert rebound(None, logits, 2)[1].tolist() == [[5, 6]]
    assert ids.tolist() == [[5, 6]] and torch.allclose(weights, torch.tensor([[0.9, 0.5]]))
    assert rebound(None, logits, 2)[1].tolist() == [[1, 2]]


def test_each_woven_layer_reroutes_with_its_own_engines_reroute(monkeypatch):
    """Two engines' layers in one process: apply hands select_experts the reroute of the layer it runs, and
    the dispatcher's expert count only for that call; the platform object holds nothing."""
    import vllm.forward_context

    dispatcher = SimpleNamespace(num_experts_local=16)
    monkeypatch.setattr(vllm.forward_context, "get_forward_context",
                        lambda: SimpleNamespace(moe_comm_method=SimpleNamespace(token_dispatcher=dispatcher)))
    select = ascend.rerouted_select(lambda logits: (logits, logits.argmax(-1, keepdim=True)))
    seen = []

    def apply(method, layer, logits):
        seen.append(dispatcher.num_experts_local)
        return select(logits)[1]

    woven = ascend.woven_apply(apply)
    layers = []
    for offset, slots in ((100, 20), (200, 24)):
        layer = torch.nn.Module()
        layer.w13_weight = torch.nn.Parameter(torch.empty(slots, 1), requires_grad=False)
        setattr(layer, ascend.REROUTE_ATTR, lambda ids, offset=offset: ids + offset)
        layers.append(layer)
    logits = torch.tensor([[0.1, 0.9, 0.5]])
    assert woven(None, layers[0], logits).tolist() == [[101]]
    assert woven(None, layers[1], logits).tolist() == [[201]]
    assert woven(None, torch.nn.Module(), logits).tolist() == [[1]]  # a layer no engine wove
    assert seen == [20, 24, 16] and dispatcher.num_experts_local == 16
    assert vars(VllmAscend()) == {}


def test_every_vllm_ascend_patch_is_a_checked_hook():
    """The vllm-ascend rows of patching.PATCHES are targets HOOKS checks against the pinned sources."""
    from expertweave_ascend.integrations.vllm.patching import ASCEND, PATCHES

    rows = {p.target for p in PATCHES if ASCEND in p.platforms}
    assert rows and rows <= {hook.target for hook in HOOKS}
    assert {VllmAscend.MOE_APPLY, VllmAscend.SELECT_EXPERTS} <= rows


# -- engine options that break the slot layout are refused before anything is mapped -----------------
def engine_options(mix=False, prefetch=False, moe_ratios=None, experts=64, top_k=6):
    hf = SimpleNamespace(n_routed_experts=experts, num_experts_per_tok=top_k)
    ratios = {} if moe_ratios is None else {"moe": moe_ratios}
    ascend = SimpleNamespace(mix_placement=mix,
                             weight_prefetch_config=SimpleNamespace(enabled=prefetch, prefetch_ratio=ratios))
    return hf, ascend


def test_the_default_options_are_accepted_up_to_the_largest_routing_table():
    check_options(*engine_options(), max_adapters=761)  # 762 x 64 = 48,768 entries at top-6
    check_options(*engine_options(prefetch=True, moe_ratios={"gate_up": 0.0}), max_adapters=8)


@pytest.mark.parametrize("options, max_adapters, problem", [
    (dict(mix=True), 8, "mix_placement puts the shared experts after the routed ones"),
    (dict(prefetch=True), 8, "weight prefetch of MoE weights reads a share of the enlarged w13"),
    (dict(prefetch=True, moe_ratios={"gate_up": 0.5}), 8, "weight prefetch of MoE weights"),
    ({}, 762, "763 x 64 entries; the Ascend C reroute kernel stages at most 48768 at top-6"),
])
def test_options_that_break_the_slot_layout_are_refused_in_one_line(options, max_adapters, problem):
    with pytest.raises(ExpertWeaveError) as excinfo:
        check_options(*engine_options(**options), max_adapters=max_adapters)
    assert problem in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_more_slots_than_npu_moe_init_routing_takes_are_refused():
    layer = torch.nn.Module()
    with pytest.raises(ExpertWeaveError, match="5121 expert slots per MoE layer, but npu_moe_init_routing takes at most 5120"):
        VllmAscend().replace_expert_weight(layer, "w13_weight", torch.empty(5121, 1))
    VllmAscend().replace_expert_weight(layer, "w13_weight", torch.empty(5120, 1))
    assert layer.w13_weight.shape[0] == 5120
