"""`expertweave serve`'s own process: a server that fails to start is reported in one line naming the
root cause and the flag to change, its tracebacks kept out of the terminal (checked on a real failed
start, and on vLLM's log format line by line)."""

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from expertweave_ascend.integrations.vllm.launch import TracebackFilter, tracebacks_file  # noqa: E402
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


def private(directory: Path) -> bool:
    info = os.lstat(directory)
    return stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()


def test_the_tracebacks_file_follows_no_symlink_planted_in_the_temporary_directory(tmp_path, monkeypatch):
    """Another user's symlinks, at the name the file had before and at a directory name they guessed,
    must not make a server run as root write to (or truncate) the file they point to."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "tracebacks.log").write_text("not the server's")
    (tmp_path / "expertweave-serve-8000-tracebacks.log").symlink_to(victim / "tracebacks.log")
    (tmp_path / "expertweave-serve-8000-guessed").symlink_to(victim)
    monkeypatch.setattr(tempfile, "_get_candidate_names", lambda: iter(["guessed", "fresh"]))
    with tracebacks_file(8000) as tracebacks:
        tracebacks.write("Traceback (most recent call last):\n")
    kept = Path(tracebacks.name)
    assert kept == tmp_path / "expertweave-serve-8000-fresh" / "tracebacks.log"
    assert (victim / "tracebacks.log").read_text() == "not the server's" and os.listdir(victim) == ["tracebacks.log"]
    assert private(kept.parent) and stat.S_IMODE(os.lstat(kept).st_mode) == 0o600
    assert kept.read_text() == "Traceback (most recent call last):\n"


def test_a_failed_start_is_one_line_naming_the_cause_and_the_flag(tiny):
    """vLLM's CPU worker refuses to reserve 99% of memory: the real failure, through the real CLI."""
    result = subprocess.run([sys.executable, "-m", "expertweave_ascend.cli", "serve", str(tiny / "base"),
                             "--port", str(free_port()), "--", "--gpu-memory-utilization", "0.99",
                             "--max-model-len", "256", "--enforce-eager"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr[-2000:]
    assert errors[0].startswith("error: the server did not start: ValueError: Available memory on node")
    assert "; size the KV cache instead: -- --kv-cache-memory-bytes SIZE (tracebacks in " in errors[0]
    kept = Path(errors[0].split("(tracebacks in ")[1].split(";")[0])
    assert "Traceback (most recent call last):" in kept.read_text() and private(kept.parent)
