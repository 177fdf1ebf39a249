"""scripts/serve_atlas.sh run as an Atlas user runs it: on an Atlas server with its CANN toolkit, or here on the
CPU (vLLM 0.23, tests/vllm023) with a stand-in toolkit."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
SERVE_ATLAS = ROOT / "scripts" / "serve_atlas.sh"
START_TIMEOUT_S = 300


@contextmanager
def atlas_server(base: Path, serve_args: list[str], vllm_args: list[str], workdir: Path, port: int,
                 stand_in_toolkit: bool = True):
    """`scripts/serve_atlas.sh BASE SERVE_ARGS --host 127.0.0.1 --port PORT --detach -- VLLM_ARGS`, as an Atlas
    user runs it, with this environment's `expertweave`; with stand_in_toolkit, a stand-in CANN toolkit (an
    empty set_env.sh: no CANN here; the NPU and HCCL variables the script sets are unused on the CPU). Yields
    (url, the script's report, the server's log); stops the server (SIGTERM, as the script does) at the end."""
    log, pid_file = workdir / "serve.log", workdir / "serve.pid"
    env = {"EXPERTWEAVE": str(Path(sys.executable).parent / "expertweave")}
    if stand_in_toolkit:
        toolkit = workdir / "stand-in-cann-toolkit"
        toolkit.mkdir()
        (toolkit / "set_env.sh").write_text("# stand-in: no CANN on this machine\n")
        # vLLM binds each CPU worker to a NUMA node of its own unless told which cores to use (one node here)
        env |= {"ASCEND_TOOLKIT_HOME": str(toolkit), "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    command = [str(SERVE_ATLAS), str(base), *serve_args, "--host", "127.0.0.1", "--port", str(port),
               "--log", str(log), "--pid-file", str(pid_file), "--timeout", str(START_TIMEOUT_S), "--detach",
               "--", *vllm_args]
    report = subprocess.run(command, env={**os.environ, **env}, capture_output=True, text=True,
                            timeout=START_TIMEOUT_S + 60)
    if report.returncode != 0:
        pytest.fail(f"serve_atlas.sh failed ({report.returncode}):\n{report.stdout}\n{report.stderr}")
    pid = int(pid_file.read_text())
    try:
        yield f"http://127.0.0.1:{port}", report.stdout, log
    finally:
        subprocess.run(["kill", "-TERM", str(pid)])
        for _ in range(120):
            if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0:
                break
            time.sleep(0.5)
        else:
            subprocess.run(["kill", "-KILL", str(pid)])


def models(url: str) -> dict[str, dict]:
    return {card["id"]: card for card in requests.get(f"{url}/v1/models", timeout=30).json()["data"]}
