"""Runtime loading on a real server started with --allow-runtime-loading, --adapter-root and vLLM's
--api-key: the routes are guarded by the key, and loads read only inside the adapter root."""

import os
import time

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("vllm")
requests = pytest.importorskip("requests")

from serving import ENGINE_ARGS, running_server  # noqa: E402

KEY = "sk-expertweave-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def root(tiny, tmp_path_factory):
    """An adapter root holding law and math, a symlink out of it, and an adapter whose weights link out."""
    root = tmp_path_factory.mktemp("adapter-root")
    for name in ("law", "math"):
        os.symlink(tiny / "adapters" / name, root / name)  # resolves outside root: must be refused
    real = root / "code"
    real.mkdir()
    for file in (tiny / "adapters" / "code").iterdir():
        (real / file.name).write_bytes(file.read_bytes())
    leaky = root / "leaky"
    leaky.mkdir()
    (leaky / "expert_cfg.json").write_bytes((real / "expert_cfg.json").read_bytes())
    os.symlink(tiny / "adapters" / "code" / "model.safetensors", leaky / "model.safetensors")
    foreign = root / "foreign"  # a safetensors file that is not an adapter, with a tell-tale tensor name
    foreign.mkdir()
    (foreign / "expert_cfg.json").write_text('{"experts": {}}')
    save_file({"payroll.secret_salary_table": torch.zeros(2)}, foreign / "model.safetensors")
    fifo = root / "fifo"  # weights that would block whoever opened them until a writer came
    fifo.mkdir()
    (fifo / "expert_cfg.json").write_bytes((real / "expert_cfg.json").read_bytes())
    os.mkfifo(fifo / "model.safetensors")
    return root


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    return tmp_path_factory.mktemp("server") / "serve.log"


@pytest.fixture(scope="module")
def server(tiny, root, log):
    argv = ["serve", str(tiny / "base"), "--allow-runtime-loading", "--adapter-root", str(root),
            "--", *ENGINE_ARGS, "--api-key", KEY]
    with running_server(argv, log, AUTH) as url:
        yield url


def load(url, body, headers=AUTH):
    return requests.post(f"{url}/v1/load_esft_adapter", json=body, headers=headers, timeout=120)


def test_the_load_and_unload_routes_need_the_api_key(server):
    assert load(server, {"adapter_name": "code"}, headers={}).status_code == 401
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "code"}, timeout=60)
    assert r.status_code == 401


def test_an_adapter_is_named_by_its_directory_under_the_root(server, root, log):
    r = load(server, {"adapter_name": "code"})
    assert r.status_code == 200, r.text
    sha256 = r.json()["sha256"]
    r = requests.post(f"{server}/v1/completions", headers=AUTH, timeout=120,
                      json={"model": "code", "prompt": "def add(a, b):", "max_tokens": 4})
    assert r.status_code == 200 and r.json()["model"] == "code"
    r = requests.post(f"{server}/v1/unload_esft_adapter", json={"adapter_name": "code", "timeout": 0}, headers=AUTH,
                      timeout=60)
    assert r.status_code == 200, r.text
    unloaded = f"unloaded adapter 'code' (sha256 {sha256})"
    deadline = time.monotonic() + 10  # the server's output reaches the log through expertweave serve's relay
    while True:
        audit = [line for line in log.read_text().splitlines() if " expertweave: " in line]
        if any(unloaded in line for line in audit) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert any(f"loaded adapter 'code' from {root / 'code'} (sha256 {sha256}" in line for line in audit), audit
    assert any(unloaded in line for line in audit), audit


@pytest.mark.parametrize("body, shown", [
    ({"adapter_name": "x", "adapter_path": "../"}, "'../'"),
    ({"adapter_name": "x", "adapter_path": "/etc"}, "'/etc'"),
    ({"adapter_name": "law"}, "'law'"),
    ({"adapter_name": "leaky"}, "leaky/model.safetensors"),
])
def test_paths_leading_out_of_the_root_are_403_and_read_nothing(server, tiny, body, shown):
    r = load(server, body)
    assert r.status_code == 403, r.text
    message = r.json()["error"]["message"]
    assert shown in message and "leads outside the adapter root; nothing was read" in message
    assert str(tiny) not in message


def test_a_fifo_is_refused_unread_and_the_server_keeps_answering(server):
    r = load(server, {"adapter_name": "fifo"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("fifo/model.safetensors: is a FIFO, device or socket, not a regular file; "
                                            "it was not read")
    assert requests.get(f"{server}/health", timeout=10).status_code == 200


def test_load_errors_do_not_echo_what_the_files_hold(server, log):
    r = load(server, {"adapter_name": "foreign"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "foreign/model.safetensors: holds a tensor that is not an expert weight"
    assert "payroll.secret_salary_table" in log.read_text(), "the server's own log keeps the full message"


def test_errors_inside_the_root_do_not_show_the_servers_paths(server, root):
    r = load(server, {"adapter_name": "nothing-here"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "nothing-here: not a directory (missing)"
    assert str(root) not in r.text
