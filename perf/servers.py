"""OpenAI-compatible vLLM servers on loopback for the serving benchmarks: plain vLLM for the base and the
merged models, `expertweave serve` for ExpertWeave. Started together, stopped together, logs kept."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Server:
    label: str
    model: str  # the served model name requests use for the base
    url: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_args(kv_cache_bytes: int, eager: bool) -> list[str]:
    return ["--max-model-len", "512", "--kv-cache-memory-bytes", str(kv_cache_bytes),
            "--uvicorn-log-level", "warning", *(["--enforce-eager"] if eager else [])]


def start_vllm(label: str, model: Path, args: list[str], log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", label, "--host", "127.0.0.1", "--port", str(port), *args]
    return _spawn(label, label, argv, port, log_dir)


def start_expertweave(label: str, base: Path, max_adapters: int, args: list[str], log_dir: Path,
                      serve_args: tuple[str, ...] = ()) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "expertweave_ascend.cli", "serve", str(base), "--base-name", "base",
            "--max-adapters", str(max_adapters), "--allow-runtime-loading", *serve_args, "--host", "127.0.0.1",
            "--port", str(port), "--", *args]
    return _spawn(label, "base", argv, port, log_dir)


def _spawn(label: str, model: str, argv: list[str], port: int, log_dir: Path) -> Server:
    log = log_dir / f"{label}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    return Server(label, model, f"http://127.0.0.1:{port}", proc, log)


def wait_ready(servers: list[Server], timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    pending = list(servers)
    while pending:
        for server in list(pending):
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.label} server exited with {server.proc.returncode}; "
                                   f"log {server.log}:\n{server.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{server.url}/v1/models", timeout=2):
                    pending.remove(server)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
        if time.time() > deadline:
            raise RuntimeError(f"servers not ready after {timeout_s} s: {', '.join(s.label for s in pending)}")
        time.sleep(1)


def post(server: Server, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"{server.url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{server.label} {path}: HTTP {e.code}: {e.read().decode()[:500]}") from None


def get(server: Server, path: str) -> dict:
    with urllib.request.urlopen(f"{server.url}{path}", timeout=60) as response:
        return json.loads(response.read())


def metrics(server: Server) -> dict[str, float]:
    """The server's unlabelled /metrics series, by name."""
    with urllib.request.urlopen(f"{server.url}/metrics", timeout=60) as response:
        lines = response.read().decode().splitlines()
    return {name: float(value) for name, value in (line.rsplit(" ", 1) for line in lines
                                                    if line and not line.startswith("#") and "{" not in line)}


def stop(servers: list[Server]) -> None:
    for server in servers:
        server.proc.terminate()
    for server in servers:
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
