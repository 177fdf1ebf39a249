"""`expertweave serve`'s own process: it builds the API server's command line and environment, starts the
server (server.py, vLLM's API server with our front-end) and stays beside it, passing its output on.

vLLM reports a failed start with several tracebacks from several processes; they are kept out of the
terminal (in a file named in the last line, or shown with --debug) and the user gets one line: the root
cause, the first exception any process raised, and which flag to change when the cause is a known one.
"""

import contextlib
import importlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from ...geometry import BaseGeometry
from . import admission, platforms, server
from .engine import refuse_data_parallelism
from .llm import WORKER_EXTENSION, engine_config
from .server import ServerOptions

READY = "Application startup complete."  # uvicorn's line once the server serves
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


def serve_command(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str],
                  max_adapters: int, adapter_slots: int | None, base_name: str | None,
                  options: ServerOptions = ServerOptions()) -> list[str]:
    """The API server's command line (python -m server) for ExpertWeave."""
    config = {"expertweave": {**engine_config(BaseGeometry.from_checkpoint(base), adapters, max_adapters,
                                              adapter_slots, host_adapter_bytes=options.host_adapter_bytes,
                                              warm=True, consolidate_rel_l2=options.consolidate_rel_l2,
                                              shared_experts=options.shared_experts),
                              "server": asdict(options)}}
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in vllm_args if arg.startswith("--")}
    defaults = [f"--{key.replace('_', '-')}={value}" for key, value in platforms.current().engine_defaults(given).items()]
    return [sys.executable, "-m", server.__name__, "--model", base,
            "--served-model-name", base_name or Path(base).name, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(config), "--worker-extension-cls", WORKER_EXTENSION, *defaults,
            *admission.with_processors_args(vllm_args)]


def serve_environment(environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: the user's, VLLM_PLUGINS included as given (it filters every plugin group,
    vllm-ascend's platform plugin too, and ExpertWeave needs none), with the platform's defaults added."""
    env = dict(environ)
    for key, value in platforms.current().engine_environment().items():
        env.setdefault(key, value)
    return env


class TracebackFilter:
    """Splits the server's output lines into those shown and the tracebacks kept aside, per process, and
    remembers the root cause (the first exception line) and whether the server came up."""

    def __init__(self):
        self.in_traceback: set[str] = set()
        self.cause: str | None = None
        self.ready = False

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


def engine_options(vllm_args: list[str]) -> dict:
    """What `vllm serve`'s own parser reads from the arguments given for vLLM, in every spelling it accepts
    (short flags, underscores, `--flag=value`, abbreviations, --config files); nothing where it refuses them
    (the server then says why, as vLLM does) or they ask for its help."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_args = importlib.import_module(platforms.current().CLI_ARGS)
    parser = cli_args.make_arg_parser(FlexibleArgumentParser(add_help=False))
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return vars(parser.parse_args(vllm_args))
    except SystemExit:
        return {}


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
    refuse_data_parallelism("expertweave serve", engine_options(vllm_args), os.environ, flags=True)
    argv = serve_command(base, adapters, host, port, vllm_args, max_adapters, adapter_slots, base_name, options)
    process = subprocess.Popen(argv, env=serve_environment(dict(os.environ)), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    for signum in (signal.SIGINT, signal.SIGTERM):  # the server stops itself; this process waits for it
        signal.signal(signum, lambda sig, frame: process.send_signal(sig))
    output = TracebackFilter()
    with tracebacks_file(port) as tracebacks:
        for line in process.stdout:
            if debug or output.shown(line):
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                tracebacks.write(line)
                tracebacks.flush()
    code = process.wait()
    if code > 0:
        where = "" if debug else f" (tracebacks in {tracebacks.name}; --debug shows them)"
        print(f"error: {output.summary()}{where}", file=sys.stderr)
    elif not os.path.getsize(tracebacks.name):  # nothing kept: no empty directory left behind per run
        os.remove(tracebacks.name)
        os.rmdir(os.path.dirname(tracebacks.name))
    return code
