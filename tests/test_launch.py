"""`expertweave serve`'s own process: a server that fails to start is reported in one line naming the
root cause and the flag to change, its tracebacks kept out of the terminal (checked on a real failed
start, and on vLLM's log format line by line)."""

import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from expertweave_ascend.integrations.vllm.launch import TracebackFilter  # noqa: E402
from perf.servers import free_port  # noqa: E402

FAILED_START = """\
(APIServer pid=4100) INFO 11-30 15:02:20 [utils.py:1] vLLM API server version 0.32.0
(VllmWorker-0 pid=4123) ERROR 11-30 15:02:26 [multiproc_executor.py:953] WorkerProc failed to start.
(VllmWorker-0 pid=4123) ERROR 11-30 15:02:26 [multiproc_executor.py:953] Traceback (most recent call last):
(EngineCore pid=4110) INFO 11-30 15:02:26 [multiproc_executor.py:479] waiting for worker exit count=1
(VllmWorker-0 pid=4123) ERROR 11-30 15:02:26 [multiproc_executor.py:953]   File "cpu_worker.py", line 80, in __init__
(VllmWorker-0 pid=4123) ERROR 11-30 15:02:26 [multiproc_executor.py:953]     raise ValueError(
(VllmWorker-0 pid=4123) ERROR 11-30 15:02:26 [multiproc_executor.py:953] ValueError: Available memory on node 0 is low
(EngineCore pid=4110) ERROR 11-30 15:02:27 [core.py:1510] Traceback (most recent call last):
(EngineCore pid=4110) ERROR 11-30 15:02:27 [core.py:1510]   File "core.py", line 1482, in run_engine_core
(EngineCore pid=4110) ERROR 11-30 15:02:27 [core.py:1510] Exception: WorkerProc initialization failed
Process EngineCore:
Traceback (most recent call last):
  File "process.py", line 314, in _bootstrap
RuntimeError: Engine core initialization failed. See root cause above.
"""


def test_tracebacks_are_kept_aside_and_the_first_exception_is_the_cause():
    output = TracebackFilter()
    shown = [line for line in FAILED_START.splitlines() if output.shown(line)]
    assert shown == FAILED_START.splitlines()[:2] + [FAILED_START.splitlines()[3], "Process EngineCore:"]
    assert output.summary() == ("the server did not start: ValueError: Available memory on node 0 is low; size the "
                                "KV cache instead: -- --kv-cache-memory-bytes SIZE")


def test_a_server_that_came_up_and_stopped_says_so():
    output = TracebackFilter()
    assert output.shown("(APIServer pid=1) INFO 11-30 15:02:27 [launcher.py:1] Application startup complete.")
    assert not output.shown("Traceback (most recent call last):")
    assert not output.shown("OSError: [Errno 98] Address already in use")
    assert output.shown("INFO:     Shutting down")
    assert output.summary() == "the server stopped: OSError: [Errno 98] Address already in use; choose another --port"


def test_a_failed_start_is_one_line_naming_the_cause_and_the_flag(tiny):
    """vLLM's CPU worker refuses to reserve 99% of memory: the real failure, through the real CLI."""
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "serve", str(tiny / "base"),
                             "--port", str(free_port()), "--", "--gpu-memory-utilization", "0.99",
                             "--max-model-len", "256"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    assert errors[0].startswith("error: the server did not start: ValueError: Available memory on node")
    assert "; size the KV cache instead: -- --kv-cache-memory-bytes SIZE (tracebacks in " in errors[0]
    kept = errors[0].split("(tracebacks in ")[1].split(";")[0]
    assert "Traceback (most recent call last):" in open(kept).read()
