"""The engine interface and its platform classes, checked on the CPU: each class implements the
protocol the integration calls, the one for this process is picked once (by device and vLLM line), the
CUDA class's decisions on vLLM's own configs (which MoE layers it refuses, the engine arguments it adds),
and how an adapter expert is split over tensor-parallel ranks. The runner methods the classes wrap run in
every engine test (vLLM 0.32 here, 0.23 in tests/vllm023); the vllm-ascend class's own names are checked
in tests/test_vllm_ascend_hooks.py."""

import ast
import inspect
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend  # noqa: E402
from vllm.utils.import_utils import resolve_obj_by_qualname  # noqa: E402

import expertweave_ascend  # noqa: E402
from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402
from expertweave_ascend.integrations.vllm import engine, platforms  # noqa: E402
from expertweave_ascend.integrations.vllm.engine import EnginePlatform, shard_expert  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.ascend import VllmAscend  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cpu import VllmCpu  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cpu023 import Vllm023Cpu  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.cuda import VllmCuda  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.runner import refuse_model_runner_v2  # noqa: E402
from expertweave_ascend.integrations.vllm import server  # noqa: E402
from expertweave_ascend.integrations.vllm.launch import serve_command  # noqa: E402
from expertweave_ascend.integrations.vllm.engine import SCHEDULER  # noqa: E402

PLATFORMS = (VllmCpu, VllmCuda, Vllm023Cpu, VllmAscend)
PACKAGE = Path(expertweave_ascend.__file__).parent


# -- the interface -------------------------------------------------------------------------------------
def protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(EnginePlatform).items()
            if inspect.isfunction(member) and not name.startswith("_")}


@pytest.mark.parametrize("cls", PLATFORMS, ids=lambda c: c.__name__)
def test_each_platform_class_implements_the_protocol_with_its_signatures(cls):
    platform = cls()
    assert isinstance(platform, EnginePlatform) and platform.name
    for name, wanted in protocol_methods().items():
        found = inspect.signature(getattr(cls, name))
        assert list(found.parameters) == list(wanted.parameters), f"{cls.__name__}.{name}{found} is not {wanted}"


def attributes_on(tree: ast.Module, receivers: tuple[str, ...]) -> set[str]:
    """Attribute names looked up on any of the receivers (dotted), or on a call to platforms.current()."""
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and (
        ast.unparse(n.value) in receivers or ast.unparse(n.value) == "platforms.current()")}


def test_the_integration_calls_only_what_the_protocol_names():
    used = set()
    for file in ("worker.py", "layer.py", "llm.py", "server.py", "scheduler.py", "grouping.py", "pairing.py"):
        used |= attributes_on(ast.parse((Path(engine.__file__).parent / file).read_text()), ("self.api", "api"))
    assert {"check_engine", "iter_moe_layers", "patch_model_runner", "batch_layout", "moe_token_rows",
            "pack_expert", "engine_defaults", "CLI_ARGS", "SCHEDULER_SEATS", "SCHEDULER_WAITING",
            "finished_request_id"} <= used
    named = set(protocol_methods()) | set(EnginePlatform.__annotations__) | {"finished_request_id"}
    assert used <= named, used - named


def module_imports(path: Path) -> set[str]:
    """The expertweave_ascend modules a file imports when it is imported (module level, not in functions)."""
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = f"{base}.{node.module}" if node.level and node.module else (node.module or base)
            found |= {module} | {f"{module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.startswith("expertweave_ascend")}


def test_the_package_has_no_import_cycles():
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in PACKAGE.rglob("*.py")}
    graph = {name: {m for m in module_imports(path) if m in modules and m != name} for name, path in modules.items()}
    assert "expertweave_ascend.integrations.vllm.engine" in graph["expertweave_ascend.integrations.vllm.layer"]
    done, active = set(), []

    def visit(name):
        if name in active:
            raise AssertionError("import cycle: " + " -> ".join(active[active.index(name):] + [name]))
        if name in done:
            return
        active.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        active.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_this_process_gets_the_cpu_platform_once(monkeypatch):
    assert type(platforms.current()) is VllmCpu and platforms.current() is platforms.current()
    platform = type(sys.modules["vllm.platforms"].current_platform)
    try:
        monkeypatch.setattr(platform, "is_cuda", lambda self: True)
        platforms.current.cache_clear()
        assert type(platforms.current()) is VllmCuda
        monkeypatch.setattr(platform, "device_type", VllmAscend.DEVICE_TYPE)
        monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.23.0+empty")
        platforms.current.cache_clear()
        assert type(platforms.current()) is VllmAscend
    finally:
        monkeypatch.undo()
        platforms.current.cache_clear()
    assert type(platforms.current()) is VllmCpu


@pytest.mark.parametrize("version, cls", [("0.32.0", VllmCpu), ("0.23.0", Vllm023Cpu), ("0.23.1+empty", Vllm023Cpu)])
def test_the_cpu_platform_is_chosen_by_the_vllm_line(monkeypatch, version, cls):
    monkeypatch.setattr(sys.modules["vllm"], "__version__", version)
    platforms.current.cache_clear()
    try:
        assert type(platforms.current()) is cls
    finally:
        platforms.current.cache_clear()


def test_a_vllm_line_no_platform_is_written_for_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(sys.modules["vllm"], "__version__", "0.25.0")
    monkeypatch.setattr(type(sys.modules["vllm.platforms"].current_platform), "is_cuda", lambda self: True)
    platforms.current.cache_clear()
    try:
        with pytest.raises(ExpertWeaveError, match=r"^ExpertWeave on CUDA runs on vLLM 0\.32, and this is vLLM 0\.25: "
                                                   "install the versions the README names$"):
            platforms.current()
    finally:
        platforms.current.cache_clear()


def test_model_runner_v2_is_refused_when_expertweave_is_on():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2

    from expertweave_ascend.integrations.vllm import worker

    worker.install_hooks()
    assert getattr(ModelRunnerV2.load_model, "_expertweave", False), "Model Runner V2's load_model is not hooked"
    runner = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={"expertweave": {"max_adapters": 2}}))
    with pytest.raises(ExpertWeaveError, match="start it with VLLM_USE_V2_MODEL_RUNNER=0"):
        refuse_model_runner_v2(runner)
    refuse_model_runner_v2(SimpleNamespace(vllm_config=SimpleNamespace(additional_config={})))


def test_returning_routed_experts_needs_model_runner_v2_which_expertweave_refuses():
    """Returned routed experts would be slots, not expert ids; vLLM 0.32 offers them on Model Runner V2
    only, which the vLLM 0.32 classes refuse, so the V1 runner ExpertWeave runs never has them."""
    from vllm.config import VllmConfig
    from vllm.config.aux_output import AuxOutputConfig

    with pytest.raises(ValueError, match="requires Model Runner V2"):
        VllmConfig(aux_output_config=AuxOutputConfig(enable_return_routed_experts=True))


# -- which MoE layers are refused ---------------------------------------------------------------------
def parallel(tp=1, dp=1, ep=1, pcp=1, sp=1) -> FusedMoEParallelConfig:
    return FusedMoEParallelConfig(tp_size=tp, pcp_size=pcp, dp_size=dp, ep_size=ep, tp_rank=0, pcp_rank=0,
                                  dp_rank=0, ep_rank=0, sp_size=sp, use_ep=ep > 1, all2all_backend="naive",
                                  enable_eplb=False)


def layer(backend=UnquantizedMoeBackend.TRITON, **sizes):
    """A stand-in for vLLM's RoutedExperts with the two attributes check_layer reads: its real parallel
    config and a quant method carrying a real UnquantizedMoeBackend (None: a quantized method)."""
    method = SimpleNamespace() if backend is None else SimpleNamespace(unquantized_backend=backend)
    return SimpleNamespace(moe_config=SimpleNamespace(moe_parallel_config=parallel(**sizes)), quant_method=method)


@pytest.mark.parametrize("cls, backend", [(VllmCuda, UnquantizedMoeBackend.TRITON),
                                          (VllmCpu, UnquantizedMoeBackend.CPU)])
def test_the_kernel_that_routes_after_select_experts_is_accepted(cls, backend):
    cls().check_layer(3, layer(backend, tp=2))


@pytest.mark.parametrize("kwargs, problem", [
    (dict(ep=2), "CUDA, MoE layer 3: expert parallelism (EP 2) is not supported"),
    (dict(dp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(pcp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(sp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(backend=UnquantizedMoeBackend.FLASHINFER_TRTLLM),
     "vLLM chose the FlashInfer TRTLLM MoE kernel, which ExpertWeave cannot reroute; start the engine with "
     "--moe-backend triton"),
    (dict(backend=UnquantizedMoeBackend.FLASHINFER_CUTLASS), "--moe-backend triton"),
    (dict(backend=UnquantizedMoeBackend.CPU), "vLLM chose the CPU MoE kernel"),
    (dict(backend=None), "only unquantized MoE layers are supported, this one uses SimpleNamespace"),
])
def test_what_the_cuda_path_cannot_serve_is_refused_in_one_line(kwargs, problem):
    with pytest.raises(ExpertWeaveError) as excinfo:
        VllmCuda().check_layer(3, layer(**kwargs))
    assert problem in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_more_slots_than_the_triton_kernel_aligns_are_refused():
    with pytest.raises(ExpertWeaveError, match="993 expert slots per MoE layer, but vLLM's Triton fused MoE aligns "
                                               "at most 992"):
        VllmCuda().replace_expert_weight(SimpleNamespace(), "w13_weight", torch.empty(993, 1))


# -- engine arguments and environment -----------------------------------------------------------------
@pytest.fixture
def served(tiny):
    """The API server's arguments as its process reads them from the command line `expertweave serve` builds."""
    return lambda vllm_args: server.serve_args(serve_command(str(tiny / "base"), {}, "127.0.0.1", 8000, vllm_args, 4,
                                                             None, None)[3:])


def test_on_the_cpu_serve_sizes_the_kv_cache_unless_told(served, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = served([])
    assert (args.kv_cache_memory_bytes, args.max_model_len) == (1 << 30, -1)
    assert args.moe_backend == "auto"
    args = served(["--max-model-len", "512"])
    assert (args.kv_cache_memory_bytes, args.max_model_len) == (1 << 30, 512)
    for given, memory in ((["--kv-cache-memory-bytes", "1G"], 1 << 30), (["--kv_cache_memory_bytes=9"], 9)):
        args = served(given)
        assert (args.kv_cache_memory_bytes, args.max_model_len) == (memory, None), given
    args = served(["--gpu-memory-utilization=0.5"])
    assert (args.kv_cache_memory_bytes, args.max_model_len, args.gpu_memory_utilization) == (None, None, 0.5)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "4")
    assert VllmCpu().engine_defaults(set()) == {"scheduler_cls": SCHEDULER}


def test_on_the_cpu_engines_run_expertweaves_scheduler_unless_told(served):
    assert served([]).scheduler_cls == SCHEDULER
    assert resolve_obj_by_qualname(SCHEDULER).__name__ == "ExpertWeaveScheduler"
    assert served(["--scheduler-cls", "mine.Scheduler"]).scheduler_cls == "mine.Scheduler"


def test_on_cuda_serve_asks_for_the_triton_moe_kernel_unless_told_otherwise(served, monkeypatch):
    monkeypatch.setattr(platforms, "current", VllmCuda)
    args = served(["--max-model-len", "512"])
    assert (args.moe_backend, args.max_model_len) == ("triton", 512)
    assert served(["--moe-backend=auto"]).moe_backend == "auto"


@pytest.mark.parametrize("cls", (VllmCpu, VllmCuda), ids=lambda c: c.__name__)
def test_the_engine_runs_the_v1_model_runner_whose_hooks_are_installed(cls, monkeypatch):
    monkeypatch.setattr(platforms, "current", cls)
    assert server.serve_environment({})["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert server.serve_environment({"VLLM_USE_V2_MODEL_RUNNER": "1"})["VLLM_USE_V2_MODEL_RUNNER"] == "1"


# -- one adapter expert over tensor-parallel ranks ----------------------------------------------------
def test_one_rank_holds_the_whole_expert():
    w13, w2 = torch.randn(2 * 6, 4), torch.randn(4, 6)
    shard13, shard2 = shard_expert(w13, w2, 0, 1)
    assert torch.equal(shard13, w13) and torch.equal(shard2, w2)


def test_each_rank_holds_its_rows_of_gate_and_up_and_its_columns_of_down():
    inter, hidden, tp = 6, 4, 3
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    shards = [shard_expert(torch.cat([gate, up]), down, rank, tp) for rank in range(tp)]
    for rank, (w13, w2) in enumerate(shards):
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(w13, torch.cat([gate[rows], up[rows]]))
        assert torch.equal(w2, down[:, rows])
    # the ranks' down columns put back together are the expert's
    assert torch.equal(torch.cat([w2 for _, w2 in shards], dim=1), down)


def test_an_expert_that_does_not_split_evenly_is_refused():
    with pytest.raises(ExpertWeaveError, match=r"cannot be split over 4 tensor-parallel ranks"):
        shard_expert(torch.randn(12, 4), torch.randn(4, 6), 0, 4)
