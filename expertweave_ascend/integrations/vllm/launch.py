"""`expertweave serve`'s own process: it builds the API server's command line, starts the server (server.py,
vLLM's API server with our front-end) and stays beside it, passing its output on. It imports no vLLM: the
server process reads vLLM's arguments, once, with vLLM's own parser (server.serve_args).

vLLM reports a failed start with several tracebacks from several processes; they are kept out of the
terminal (in a file named in the last line, or shown with --debug) and the user gets one line: the root
cause, the first exception any process raised, and which flag to change when the cause is a known one.
A start the server refuses itself (server.main: exit status 2, one `error:` line) is passed on as it is.
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from ...geometry import BaseGeometry
from .engine import WORKER_EXTENSION, engine_config

SERVER_MODULE = f"{__package__}.server"
READY = "Application startup complete."  # uvicorn's line once the server serves
REFUSAL = "error: "  # how server.main's one line refusing a start begins
# vLLM's log prefix: "(EngineCore pid=7) " for its child processes, then "ERROR 11-30 15:02:27 [core.py:1510] ".
LOG_LINE = re.compile(r"^(?:\((?P<process>[^)]*)\) )?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:]+ \[[^]]*\] )?"
                      r"(?P<text>.*)$")
EXCEPTION = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Z]\w*: ")
# Known causes of a failed start, and what to change.
HINTS = (
    ("Available memory on node", "size the KV cache instead: -- --kv-cache-memory-bytes SIZE"),
    ("KV cache memory", "give -- --max-model-len N (shorter) or -- --kv-cache-memory-bytes SIZE (larger)"),
    ("Address already in use", "choose another --port"),
)


@dataclass(frozen=True)
class ServerOptions:
    """`expertweave serve`'s own options, carried to the API server in additional_config."""
    runtime_loading: bool = False  # the load and unload routes exist
    adapter_root: str | None = None  # its subdirectories are adapters served by name; runtime loads stay inside
    catalogue: dict[str, str] = field(default_factory=dict)  # --adapter NAME=PATH: served by name too
    max_adapters: int = 8  # adapters on the device at once
    eviction_policy: str = "lru"
    adapter_wait_s: float = 60.0  # how long a request may wait for its adapter to be loaded (then 503)
    host_adapter_bytes: int = 0  # the workers' host tier (reported; the workers are given it in the engine config)
    warm_host_tier: bool = False  # fill the host tier from the catalogue at start, in the background
    consolidate_rel_l2: float | None = None  # near-duplicate experts share one copy (the workers are given it)
    shared_experts: bool = False  # serve adapters that tune shared experts (the workers are given it)

    @classmethod
    def of(cls, args) -> "ServerOptions":
        return cls(**((args.additional_config or {}).get("expertweave", {}).get("server") or {}))


def serve_command(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str],
                  max_adapters: int, adapter_slots: int | None, base_name: str | None,
                  options: ServerOptions = ServerOptions()) -> list[str]:
    """The API server's command line (python -m server); the server adds its platform's engine defaults
    and ExpertWeave's logits processors (server.serve_args)."""
    config = {"expertweave": {**engine_config(BaseGeometry.from_checkpoint(base), adapters, max_adapters,
                                              adapter_slots, host_adapter_bytes=options.host_adapter_bytes,
                                              warm=True, consolidate_rel_l2=options.consolidate_rel_l2,
                                              shared_experts=options.shared_experts),
                              "server": asdict(options)}}
    return [sys.executable, "-m", SERVER_MODULE, "--model", base, "--served-model-name", base_name or Path(base).name,
            "--host", host, "--port", str(port), "--additional-config", json.dumps(config),
            "--worker-extension-cls", WORKER_EXTENSION, *vllm_args]


class TracebackFilter:
    """Splits the server's output lines into those shown and the tracebacks kept aside, per process, and
    remembers the root cause (the first exception line), whether the server came up, and the server's own
    refusal to start (server.main's one `error:` line)."""

    def __init__(self):
        self.in_traceback: set[str] = set()
        self.cause: str | None = None
        self.ready = False
        self.refusal: str | None = None

    def refused(self, line: str) -> bool:
        if self.ready or not line.startswith(REFUSAL):
            return False
        self.refusal = line.rstrip("\n")
        return True

    def shown(self, line: str) -> bool:
        match = LOG_LINE.match(line.rstrip("\n"))
        process, text = match["process"] or "", match["text"]
        self.ready = self.ready or READY in text
        if text == "Traceback (most recent call last):":
            self.in_traceback.add(process)
            return False
        if process not in self.in_traceback:
            return True
        if not text.startswith(" ") and EXCEPTION.match(text):
            self.in_traceback.discard(process)
            self.cause = self.cause or text
        return False

    def summary(self) -> str:
        what = "stopped" if self.ready else "did not start"
        if self.cause is None:
            return f"the server {what}"
        hint = next((f"; {hint}" for needle, hint in HINTS if needle in self.cause), "")
        return f"the server {what}: {self.cause}{hint}"


def tracebacks_file(port: int) -> TextIO:
    """A new file for the server's tracebacks, in a new directory only this user may enter: a name others can
    predict in the shared temporary directory may be their symlink, which a server run as root would follow."""
    directory = tempfile.mkdtemp(prefix=f"expertweave-serve-{port}-")
    return open(os.path.join(directory, "tracebacks.log"), "x",
                opener=lambda path, flags: os.open(path, flags | os.O_NOFOLLOW, 0o600))


def serve(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str], max_adapters: int = 8,
          adapter_slots: int | None = None, base_name: str | None = None,
          options: ServerOptions = ServerOptions(), debug: bool = False) -> int:
    """Runs the server until it stops; its exit status, and on failure one line on stderr."""
    argv = serve_command(base, adapters, host, port, vllm_args, max_adapters, adapter_slots, base_name, options)
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    for signum in (signal.SIGINT, signal.SIGTERM):  # the server stops itself; this process waits for it
        signal.signal(signum, lambda sig, frame: process.send_signal(sig))
    output = TracebackFilter()
    with tracebacks_file(port) as tracebacks:
        for line in process.stdout:
            if output.refused(line):
                continue
            if output.shown(line) or debug:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                tracebacks.write(line)
                tracebacks.flush()
    code = process.wait()
    if code > 0 and output.refusal is None:
        where = "" if debug else f" (tracebacks in {tracebacks.name}; --debug shows them)"
        print(f"error: {output.summary()}{where}", file=sys.stderr)
        return code
    if output.refusal is not None:
        print(output.refusal, file=sys.stderr)
    if not os.path.getsize(tracebacks.name):  # nothing kept: no empty directory left behind per run
        os.remove(tracebacks.name)
        os.rmdir(os.path.dirname(tracebacks.name))
    return code
