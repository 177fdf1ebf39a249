"""The vLLM 0.32 compat layer's CUDA-path decisions, checked here on the CPU: which MoE layers it refuses
and why, how an adapter expert is split over tensor-parallel ranks, and the engine arguments it adds."""

import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from vllm.model_executor.layers.fused_moe.config import FusedMoEParallelConfig  # noqa: E402
from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend  # noqa: E402

from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402
from expertweave_ascend.integrations.vllm import compat  # noqa: E402
from expertweave_ascend.integrations.vllm.server import serve_command  # noqa: E402


def parallel(tp=1, dp=1, ep=1, pcp=1, sp=1) -> FusedMoEParallelConfig:
    return FusedMoEParallelConfig(tp_size=tp, pcp_size=pcp, dp_size=dp, ep_size=ep, tp_rank=0, pcp_rank=0,
                                  dp_rank=0, ep_rank=0, sp_size=sp, use_ep=ep > 1, all2all_backend="naive",
                                  enable_eplb=False)


def layer(backend=UnquantizedMoeBackend.TRITON, **sizes):
    """A stand-in for vLLM's RoutedExperts with the two attributes check_layer reads: its real parallel
    config and a quant method carrying a real UnquantizedMoeBackend (None: a quantized method)."""
    method = SimpleNamespace() if backend is None else SimpleNamespace(unquantized_backend=backend)
    return SimpleNamespace(moe_config=SimpleNamespace(moe_parallel_config=parallel(**sizes)), quant_method=method)


@pytest.mark.parametrize("backend", [UnquantizedMoeBackend.TRITON, UnquantizedMoeBackend.CPU])
def test_the_kernels_that_route_after_select_experts_are_accepted(backend):
    compat.check_layer(3, layer(backend, tp=2))


@pytest.mark.parametrize("kwargs, problem", [
    (dict(ep=2), "MoE layer 3: expert parallelism (EP 2) is not supported"),
    (dict(dp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(pcp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(sp=2), "MoE layer 3: data, context or sequence parallelism is not supported"),
    (dict(backend=UnquantizedMoeBackend.FLASHINFER_TRTLLM),
     "vLLM chose the FlashInfer TRTLLM MoE kernel, which ExpertWeave cannot reroute; start the engine with "
     "--moe-backend triton"),
    (dict(backend=UnquantizedMoeBackend.FLASHINFER_CUTLASS), "--moe-backend triton"),
    (dict(backend=None), "only unquantized MoE layers are supported, this one uses SimpleNamespace"),
])
def test_what_the_cuda_path_cannot_serve_is_refused_in_one_line(kwargs, problem):
    with pytest.raises(ExpertWeaveError) as excinfo:
        compat.check_layer(3, layer(**kwargs))
    assert problem in str(excinfo.value) and "\n" not in str(excinfo.value)


def test_one_rank_holds_the_whole_expert():
    w13, w2 = torch.randn(2 * 6, 4), torch.randn(4, 6)
    shard13, shard2 = compat.shard_expert(w13, w2, 0, 1)
    assert torch.equal(shard13, w13) and torch.equal(shard2, w2)


def test_each_rank_holds_its_rows_of_gate_and_up_and_its_columns_of_down():
    inter, hidden, tp = 6, 4, 3
    gate, up, down = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter)
    shards = [compat.shard_expert(torch.cat([gate, up]), down, rank, tp) for rank in range(tp)]
    for rank, (w13, w2) in enumerate(shards):
        rows = slice(2 * rank, 2 * rank + 2)
        assert torch.equal(w13, torch.cat([gate[rows], up[rows]]))
        assert torch.equal(w2, down[:, rows])
    # the ranks' down columns put back together are the expert's
    assert torch.equal(torch.cat([w2 for _, w2 in shards], dim=1), down)


def test_an_expert_that_does_not_split_evenly_is_refused():
    with pytest.raises(ExpertWeaveError, match=r"cannot be split over 4 tensor-parallel ranks"):
        compat.shard_expert(torch.randn(12, 4), torch.randn(4, 6), 0, 4)


@pytest.fixture
def tiny_base(tiny):
    return str(tiny / "base")


def test_on_the_cpu_no_engine_argument_is_added(tiny_base):
    assert compat.engine_defaults() == {}
    argv = serve_command(tiny_base, {}, "127.0.0.1", 8000, [], 4, None, None)
    assert "--moe-backend" not in argv


def test_on_cuda_serve_asks_for_the_triton_moe_kernel_unless_told_otherwise(tiny_base, monkeypatch):
    platform = sys.modules["vllm.platforms"].current_platform
    monkeypatch.setattr(type(platform), "is_cuda", lambda self: True)
    assert compat.engine_defaults() == {"moe_backend": "triton"}
    argv = serve_command(tiny_base, {}, "127.0.0.1", 8000, ["--max-model-len", "512"], 4, None, None)
    assert argv[argv.index("--moe-backend") + 1] == "triton"
    assert argv.index("--moe-backend") < argv.index("--max-model-len"), "the user's own arguments come last"
    for given in (["--moe-backend", "triton"], ["--moe-backend=auto"]):
        argv = serve_command(tiny_base, {}, "127.0.0.1", 8000, given, 4, None, None)
        assert argv.count("--moe-backend") + sum(a.startswith("--moe-backend=") for a in argv) == 1


def test_on_cuda_the_engine_runs_the_v1_model_runner_whose_hooks_are_installed(monkeypatch):
    assert compat.engine_environment() == {}
    platform = sys.modules["vllm.platforms"].current_platform
    monkeypatch.setattr(type(platform), "is_cuda", lambda self: True)
    assert compat.engine_environment() == {"VLLM_USE_V2_MODEL_RUNNER": "0"}


def test_model_runner_v2_is_refused_when_expertweave_is_on():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as ModelRunnerV2

    from expertweave_ascend.integrations.vllm import plugin

    plugin.register()
    assert getattr(ModelRunnerV2.load_model, "_expertweave", False), "Model Runner V2's load_model is not hooked"
    runner = SimpleNamespace(vllm_config=SimpleNamespace(additional_config={"expertweave": {"max_adapters": 2}}))
    with pytest.raises(ExpertWeaveError, match="start it with VLLM_USE_V2_MODEL_RUNNER=0"):
        compat.refuse_model_runner_v2(runner)
    compat.refuse_model_runner_v2(SimpleNamespace(vllm_config=SimpleNamespace(additional_config={})))


def test_returning_routed_experts_needs_model_runner_v2_which_expertweave_refuses():
    """Returned routed experts would be slots, not expert ids; vLLM 0.32 offers them on Model Runner V2
    only, which compat.refuse_model_runner_v2 refuses, so the V1 runner ExpertWeave runs never has them."""
    from vllm.config import VllmConfig
    from vllm.config.aux_output import AuxOutputConfig

    with pytest.raises(ValueError, match="requires Model Runner V2"):
        VllmConfig(aux_output_config=AuxOutputConfig(enable_return_routed_experts=True))
