"""`expertweave serve`'s front-end on the installed vLLM line (the main suite runs it on 0.32, tests/vllm023 on
0.23, where vllm-ascend 0.23 runs): how it hooks vLLM's app, the plugin groups it leaves alone, and that
the API-server process never imports a model runner (on Atlas: vllm-ascend's NPU runner). The front-end
itself runs for real in the server tests of both suites.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from expertweave_ascend.integrations.vllm import launch, platforms, server  # noqa: E402


def test_add_front_end_wraps_build_app_and_init_app_state(monkeypatch):
    module = server.api_server_module()
    seen = []

    class FrontEnd:
        def attach(self, app, options):
            seen.append(("attach", app, options))

        async def init_state(self, engine_client, state, args):
            seen.append(("init", engine_client, state))

    async def init_app_state(engine_client, state, args, supported_tasks):
        seen.append(("vllm init", supported_tasks))

    args = SimpleNamespace(additional_config={"expertweave": {"server": {"runtime_loading": True}}})
    monkeypatch.setattr(module, "build_app", lambda args, supported_tasks, model_config: "app")
    monkeypatch.setattr(module, "init_app_state", init_app_state)
    server.add_front_end(module, FrontEnd())
    assert module.build_app(args, ("generate",), None) == "app"
    import asyncio
    asyncio.run(module.init_app_state("client", "state", args, ("generate",)))
    assert seen == [("attach", "app", server.ServerOptions(runtime_loading=True)), ("vllm init", ("generate",)),
                    ("init", "client", "state")]


# -- plugin groups and processes ------------------------------------------------------------------------
def run_python(code: str, env: dict[str, str]) -> dict:
    """What a fresh interpreter with this environment prints last, as JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def loaded_plugins(env: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    """The plugins vLLM's own loader loads per group in a process with this environment, with a stand-in
    platform plugin installed (a dist-info with its entry point, as vllm-ascend has)."""
    site = tmp_path / "site"
    info = site / "stand_in_platform-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stand-in-platform\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vllm.platform_plugins]\nascend = stand_in_platform:register\n")
    (site / "stand_in_platform.py").write_text("def register():\n    return None\n")
    env = {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
    return run_python("""
        import json
        from vllm.plugins import load_plugins_by_group
        print(json.dumps({g: sorted(load_plugins_by_group(g)) for g in
                          ("vllm.platform_plugins", "vllm.general_plugins")}))
    """, env)


def test_serve_leaves_the_plugin_groups_as_the_user_set_them(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env = server.serve_environment(environ)
    assert "VLLM_PLUGINS" not in env
    loaded = loaded_plugins(env, tmp_path)
    assert "ascend" in loaded["vllm.platform_plugins"] and "expertweave" not in loaded["vllm.general_plugins"]
    assert server.serve_environment({**environ, "VLLM_PLUGINS": "ascend"})["VLLM_PLUGINS"] == "ascend"


def test_the_api_server_process_imports_no_model_runner():
    """The front-end's own modules, vLLM's general plugins and the server's argument parsing, as
    `python -m expertweave_ascend.integrations.vllm.server` runs them before the engine starts: neither
    ExpertWeave's worker module nor the platform's model runner is imported (the runner hooks are installed
    where vLLM resolves the worker extension, in the engine's worker processes only)."""
    runner_module = platforms.current().MODEL_RUNNER.split(":")[0]
    found = run_python(f"""
        import importlib, json, sys
        from vllm.plugins import load_general_plugins
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from expertweave_ascend.integrations.vllm import platforms, server
        load_general_plugins()
        cli_args = importlib.import_module(platforms.current().CLI_ARGS)
        cli_args.make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m"])
        server.add_front_end(server.api_server_module(), server.AdapterRoutes())
        print(json.dumps([m for m in ("expertweave_ascend.integrations.vllm.worker", {runner_module!r})
                          if m in sys.modules]))
    """, dict(os.environ))
    assert found == []


def test_no_endpoint_plugin_is_registered():
    from importlib.metadata import entry_points

    assert not [e for e in entry_points(group="vllm.endpoint_plugins") if e.value.startswith("expertweave")]


def test_serve_starts_this_projects_api_server_module(tiny):
    argv = launch.serve_command(str(tiny / "base"), {}, "127.0.0.1", 8000, ["--enforce-eager"], 4, None, None)
    assert argv[1:3] == ["-m", "expertweave_ascend.integrations.vllm.server"]
    assert argv[-1] == "--enforce-eager"
    assert server.serve_args(argv[3:]).logits_processors == \
        ["expertweave_ascend.integrations.vllm.contrastive:ContrastiveLogits"]


def test_expertweaves_processors_are_added_once_beside_the_users_own():
    from expertweave_ascend.integrations.vllm.admission import PROCESSORS, with_processors, with_processors_args

    ours = list(PROCESSORS)
    assert with_processors(None) == ours and with_processors(["a", ours[0]]) == ["a", *ours]
    assert with_processors_args(["--enforce-eager"]) == ["--enforce-eager", "--logits-processors", *ours]
    assert with_processors_args(["--logits-processors", "a", "b", "--x"]) == \
        ["--logits-processors", *ours, "a", "b", "--x"]
    assert with_processors_args(["--logits-processors=a"]) == ["--logits-processors", "a", *ours]
