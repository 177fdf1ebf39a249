"""Data parallelism is refused in one line before any engine starts: by ExpertWeaveLLM, by `expertweave serve`
in every spelling vLLM's own parser accepts (and VLLM_DP_SIZE), and by the vllm-ascend platform's layer
check. It is not served because it cannot be tested here: plain vLLM's CPU engine cannot run a MoE model
data-parallel (0.32 serves until the first request, 0.23 fails at start, both on the CPU communicator's
missing all_gatherv), and vLLM's DP clients answer ExpertWeave's collective RPCs with the first engine's
workers alone."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

vllm = pytest.importorskip("vllm")

from expertweave_ascend.errors import ExpertWeaveError  # noqa: E402
from expertweave_ascend.integrations.vllm import launch, server  # noqa: E402
from expertweave_ascend.integrations.vllm.llm import ExpertWeaveLLM  # noqa: E402
from expertweave_ascend.integrations.vllm.platforms.ascend import VllmAscend  # noqa: E402
from perf.servers import free_port  # noqa: E402

ADVICE = ("serve one engine per device behind a load balancer, or one engine over several devices with "
          "--tensor-parallel-size")


class EngineStarted(Exception):
    """Raised by the stand-in for what would start an engine (vllm.LLM, the API server's process)."""


def start_engine(*args, **kwargs):
    raise EngineStarted


@pytest.mark.parametrize("kwargs, environ, asked", [
    (dict(data_parallel_size=2), {}, "data_parallel_size=2"),
    # the one way vLLM's LLM itself runs data-parallel offline: one process per rank
    (dict(data_parallel_size=2, distributed_executor_backend="external_launcher"), {}, "data_parallel_size=2"),
    (dict(data_parallel_size=4, data_parallel_size_local=2), {}, "data_parallel_size=4, data_parallel_size_local=2"),
    ({}, {"VLLM_DP_SIZE": "2"}, "VLLM_DP_SIZE=2"),  # vLLM's offline data-parallel example sets it
])
def test_expertweave_llm_refuses_data_parallelism_before_an_engine_starts(tiny, monkeypatch, kwargs, environ, asked):
    monkeypatch.setattr(vllm, "LLM", start_engine)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ExpertWeaveError) as excinfo:
        ExpertWeaveLLM(str(tiny / "base"), {}, max_adapters=2, **kwargs)
    message = str(excinfo.value)
    assert message.startswith(f"ExpertWeaveLLM: data parallelism ({asked}) is not supported: ")
    assert message.endswith(ADVICE) and "\n" not in message


def test_expertweave_llm_starts_one_engine(tiny, monkeypatch):
    monkeypatch.setattr(vllm, "LLM", start_engine)
    monkeypatch.setenv("VLLM_DP_SIZE", "1")
    with pytest.raises(EngineStarted):
        ExpertWeaveLLM(str(tiny / "base"), {}, max_adapters=2, data_parallel_size=1)


def server_argv(tiny, vllm_args: list[str]) -> list[str]:
    """The API server's arguments as `expertweave serve` starts it (after `python -m MODULE`)."""
    return launch.serve_command(str(tiny / "base"), {}, "127.0.0.1", 8000, vllm_args, 4, None, None)[3:]


@pytest.mark.parametrize("vllm_args, asked", [
    (["--data-parallel-size", "2"], "--data-parallel-size 2"),
    (["-dp", "2"], "--data-parallel-size 2"),
    (["--data-parallel-size=2"], "--data-parallel-size 2"),
    (["-dp=2"], "--data-parallel-size 2"),
    (["--data_parallel_size", "2"], "--data-parallel-size 2"),
    (["-dpl", "2"], "--data-parallel-size-local 2"),
    (["--data-parallel-size-l", "2"], "--data-parallel-size-local 2"),  # argparse's abbreviation
    (["-dp", "4", "-dpl", "2", "--data-parallel-hybrid-lb"], "--data-parallel-size 4, --data-parallel-size-local 2"),
    (["-dp", "2", "--data-parallel-rank", "1"], "--data-parallel-size 2"),  # external load balancing
    (["--enforce-eager", "--config", "CONFIG"], "--data-parallel-size 2"),
])
def test_serve_refuses_each_spelling_of_data_parallelism_before_the_server_starts(tiny, tmp_path, monkeypatch,
                                                                                   vllm_args, asked):
    config = tmp_path / "config.yaml"
    config.write_text("data-parallel-size: 2\n")
    monkeypatch.delenv("VLLM_DP_SIZE", raising=False)
    with pytest.raises(ExpertWeaveError) as excinfo:
        server.serve_args(server_argv(tiny, [str(config) if arg == "CONFIG" else arg for arg in vllm_args]))
    message = str(excinfo.value)
    assert message.startswith(f"expertweave serve: data parallelism ({asked}) is not supported: ")
    assert message.endswith(ADVICE) and "\n" not in message


@pytest.mark.parametrize("vllm_args", [[], ["-dp", "1"], ["--enforce-eager", "--max-model-len", "256"]])
def test_serve_reads_one_engine(tiny, monkeypatch, vllm_args):
    monkeypatch.setenv("VLLM_DP_SIZE", "1")
    assert server.serve_args(server_argv(tiny, vllm_args)).data_parallel_size == 1


@pytest.mark.parametrize("vllm_args, code", [(["--no-such-flag"], 2), (["--help"], 0)])
def test_what_vllms_parser_refuses_or_answers_is_its_own_answer(tiny, vllm_args, code):
    with pytest.raises(SystemExit) as excinfo:
        server.serve_args(server_argv(tiny, vllm_args))
    assert excinfo.value.code == code


def test_serve_refuses_data_parallelism_asked_by_the_environment(tiny, monkeypatch):
    monkeypatch.setenv("VLLM_DP_SIZE", "2")
    with pytest.raises(ExpertWeaveError, match=r"^expertweave serve: data parallelism \(VLLM_DP_SIZE=2\) is not "):
        server.serve_args(server_argv(tiny, []))


def test_the_serve_command_refuses_data_parallelism_in_one_error_line(tiny):
    """The real entry point, in a process of its own: exit status 2, one `error:` line, no traceback and
    nothing from a server (a server that started would serve until the timeout)."""
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "serve", str(tiny / "base"),
                             "--host", "127.0.0.1", "--port", str(free_port()), "--", "--data-parallel-size", "2"],
                            capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "VLLM_DP_SIZE"})
    asked = "--data-parallel-size 2"
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "Traceback" not in output and "APIServer" not in output and "EngineCore" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    assert errors[0].startswith(f"error: expertweave serve: data parallelism ({asked}) is not supported: ")
    assert errors[0].endswith(ADVICE)


def test_vllm_ascend_refuses_a_data_parallel_moe_layer_at_engine_start(monkeypatch):
    """The engine-side refusal for engines not started by ExpertWeave's front-ends, as the CPU and CUDA
    platforms' (tests/test_engine_platforms.py)."""
    monkeypatch.setitem(sys.modules, "torch_npu", SimpleNamespace())
    layer = SimpleNamespace(mix_placement=False, moe_config=SimpleNamespace(ep_size=1, pcp_size=1, dp_size=2))
    with pytest.raises(ExpertWeaveError) as excinfo:
        VllmAscend().check_layer(3, layer)
    assert str(excinfo.value) == ("ExpertWeave on vllm-ascend, MoE layer 3: data parallelism (DP 2) is not supported: "
                                  "every engine's MoE layers would need the same adapters, but adapter loads, unloads "
                                  "and request counts are answered by one engine; serve one engine per device behind "
                                  "a load balancer, or with TP")
