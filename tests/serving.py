"""Starting `expertweave serve` for a test module: a real server process on a loopback port."""

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from perf.servers import free_port

START_TIMEOUT_S = 300
# What every test server is given after `--`: small enough for these CPU machines.
ENGINE_ARGS = ["--enforce-eager", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-memory-bytes",
               str(64 << 20)]


@contextmanager
def running_server(argv: list[str], log: Path, headers: dict | None = None):
    """Runs `python -m expertweave_ascend.cli serve ... --port P` + argv's vLLM part; yields its URL once
    /v1/models answers 200 (with headers, e.g. the API key)."""
    port = free_port()
    cmd = [sys.executable, "-m", "expertweave_ascend.cli", *argv[:argv.index("--")], "--port", str(port),
           *argv[argv.index("--"):]]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if requests.get(f"{url}/v1/models", headers=headers, timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            proc.kill()
            pytest.fail(f"server did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
        try:
            yield url
        finally:
            proc.terminate()
            proc.wait(60)
