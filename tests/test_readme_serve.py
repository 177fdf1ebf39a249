"""The README's serve example, started as written (on a free port), on this CPU machine: it starts with
the default KV cache, serves the adapter it names, and has no runtime-loading routes."""

import json
import re
import shlex
from pathlib import Path

import pytest

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from serving import running_server  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> tuple[list[str], dict]:
    """The example's serve command and the JSON body of its curl request."""
    block = re.search(r"```\n(expertweave make-tiny build/tiny\n.*?)```", README.read_text(), re.S).group(1)
    serve = next(line for line in block.splitlines() if line.startswith("expertweave serve "))
    body = re.search(r"-d '(\{.*?\})'", block).group(1)
    return shlex.split(serve)[1:], json.loads(body)


def test_the_readme_serve_example_starts_and_serves_its_adapter(tiny, tmp_path):
    argv, body = readme_example()
    argv = [arg.replace("build/tiny", str(tiny)) for arg in argv]
    with running_server([*argv, "--"], tmp_path / "serve.log") as url:
        r = requests.post(f"{url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == body["model"] and r.json()["usage"]["completion_tokens"] == body["max_tokens"]
        r = requests.post(f"{url}/v1/load_esft_adapter", json={"adapter_name": "x", "adapter_path": "y"}, timeout=30)
        assert r.status_code == 404, "runtime loading is off unless --allow-runtime-loading"
