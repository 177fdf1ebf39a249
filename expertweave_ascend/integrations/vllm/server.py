"""`expertweave serve`: vLLM's own OpenAI-compatible server with ESFT adapters as models.

vLLM's API-server code builds the app and runs it; this module adds, to the app it builds,
  POST /v1/load_esft_adapter   {"adapter_name", "adapter_path"}
  POST /v1/unload_esft_adapter {"adapter_name", "timeout"?}   waits for the adapter's requests
  GET  /v1/esft_adapters
and an ASGI middleware that turns `"model": "<adapter>"` in completions and chat completions into that
request's adapter (SamplingParams.extra_args, plus a per-adapter prefix-cache salt) and names the adapter
in the responses. It needs no endpoint plugin (vLLM 0.23 has no such plugin group) and leaves
VLLM_PLUGINS as the user set it, so platform plugins (vllm-ascend's) and other general plugins load.
Adapter names are registered as model names, so /v1/models lists them and unknown names get vLLM's 404.

Request lifetime belongs to the engine: the workers count each adapter's requests from the scheduler's
output (worker.py); unload asks them until the adapter is idle (lifetime.py). This front-end keeps only
the set of adapters being unloaded, to refuse new requests for them, here (409) and where vLLM admits
each request (admission.py).
"""

import json
import os
import sys
import warnings
from pathlib import Path

from ...adapters import validate_adapter
from ...errors import AdapterBusyError, ExpertWeaveError
from ...geometry import BaseGeometry
from . import admission, agreement, lifetime, platforms
from .engine import ADAPTER_ARG
from .llm import WORKER_EXTENSION, engine_config

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
GENERAL_PLUGIN = "expertweave"  # our entry point in vllm.general_plugins: must load in every engine process
# The vLLM details of the front-end, 0.32 and 0.23 alike. API_SERVER re-exports build_and_serve, which
# calls build_app and init_app_state by their global names where it is defined (0.32: the module
# vllm.entrypoints.launchers.api_server.entry; 0.23: API_SERVER itself). vLLM's own argument parser
# and its checks live in the first CLI_ARGS module that exists (0.32, then 0.23).
API_SERVER = "vllm.entrypoints.openai.api_server"
CLI_ARGS = ("vllm.entrypoints.launchers.cli_args", "vllm.entrypoints.openai.cli_args")


def _error(status: int, message: str, kind: str = "BadRequestError") -> "JSONResponse":
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


class AdapterRegistry:
    """The server's view of loaded adapters: names, paths, and those being unloaded."""

    def __init__(self, geometry: BaseGeometry, base_name: str):
        self.geometry = geometry
        self.base_name = base_name
        self.paths: dict[str, str] = {}
        self.unloading: set[str] = set()


class AdapterModelMiddleware:
    """ASGI middleware mapping `"model": adapter` to the adapter's extra_args, and back in responses."""

    def __init__(self, app, front_end: "ExpertWeaveFrontEnd"):
        self.app = app
        self.front_end = front_end

    async def __call__(self, scope, receive, send):
        registry = self.front_end.registry
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATE_PATHS \
                or registry is None:
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        try:
            body = json.loads(b"".join(chunks) or b"{}")
        except json.JSONDecodeError:
            body = None
        name = body.get("model") if isinstance(body, dict) else None
        if isinstance(body, dict):
            xargs = dict(body.get("vllm_xargs") or {})
            xargs.pop(ADAPTER_ARG, None)  # only the model name selects an adapter
            if name in registry.paths:
                if name in registry.unloading:
                    return await _error(409, f"adapter {name!r} is being unloaded", "ConflictError")(scope, receive, send)
                xargs[ADAPTER_ARG] = name
                body["cache_salt"] = f"expertweave:{name}"
                body["model"] = registry.base_name
            else:
                name = None
            body["vllm_xargs"] = xargs or None
            raw = json.dumps(body).encode()
        else:
            raw, name = b"".join(chunks), None

        sent = False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        if name is None:
            return await self.app(scope, replay, send)
        base = json.dumps(registry.base_name).encode()
        adapter = json.dumps(name).encode()

        async def renaming_send(message):
            if message["type"] == "http.response.start":
                message["headers"] = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
            elif message["type"] == "http.response.body":
                message["body"] = message.get("body", b"").replace(b'"model":' + base, b'"model":' + adapter) \
                    .replace(b'"model": ' + base, b'"model": ' + adapter)
            await send(message)

        await self.app(scope, replay, renaming_send)


class ExpertWeaveFrontEnd:
    """The adapter routes and middleware, added to the app vLLM's API server builds."""

    def __init__(self):
        self.registry: AdapterRegistry | None = None
        self.engine = None
        self.models = None

    def attach(self, app) -> None:
        from fastapi import Request

        if app.middleware_stack is None:
            app.add_middleware(AdapterModelMiddleware, front_end=self)
        else:  # vLLM 0.32's SageMaker bootstrap builds the stack in build_app: ours goes around it
            app.middleware_stack = AdapterModelMiddleware(app.middleware_stack, front_end=self)

        @app.post("/v1/load_esft_adapter")
        async def load_esft_adapter(request: Request):
            body = await request.json()
            name, path = body.get("adapter_name"), body.get("adapter_path")
            if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
                return _error(400, 'expected {"adapter_name": str, "adapter_path": str}')
            return await self.load(name, path)

        @app.post("/v1/unload_esft_adapter")
        async def unload_esft_adapter(request: Request):
            body = await request.json()
            name = body.get("adapter_name")
            if name not in self.registry.paths:
                return _error(404, f"adapter {name!r} is not loaded", "NotFoundError")
            try:
                timeout = float(body.get("timeout", 600))
            except (TypeError, ValueError):
                return _error(400, f"timeout {body.get('timeout')!r}: expected a number of seconds")
            return await self.unload(name, timeout)

        @app.get("/v1/esft_adapters")
        async def esft_adapters():
            adapters = (await self.engine.collective_rpc("expertweave_list_adapters"))[0]
            memory = (await self.engine.collective_rpc("expertweave_memory_report"))[0]
            return {"base_model": self.registry.base_name, "adapters": adapters, "memory": memory}

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
        self.models = state.openai_serving_models
        base_name = self.models.base_model_paths[0].name
        self.registry = AdapterRegistry(BaseGeometry.from_checkpoint(args.model), base_name)
        admission.set_gate(self._refusal)
        for name, info in (await engine_client.collective_rpc("expertweave_list_adapters"))[0].items():
            self._publish(name, info["path"])

    def _refusal(self, name: str) -> str | None:
        """Why a request for this adapter may not start now (vLLM asks as it admits the request), or None."""
        if name not in self.registry.paths:
            return f"adapter {name!r} is not loaded"
        if name in self.registry.unloading:
            return f"adapter {name!r} is being unloaded"
        return None

    def _publish(self, name: str, path: str) -> None:
        base_path = type(self.models.base_model_paths[0])
        self.registry.paths[name] = path
        self.models.base_model_paths.append(base_path(name=name, model_path=path))

    async def load(self, name: str, path: str):
        registry = self.registry
        if name in registry.paths or name == registry.base_name:
            return _error(400, f"adapter name {name!r} is already in use")
        try:
            validate_adapter(path, registry.geometry)
            outcome = agreement.check_load(name, await self.engine.collective_rpc("expertweave_load_adapter",
                                                                                  args=(name, path)))
            if outcome.roll_back:
                await self.engine.collective_rpc("expertweave_discard_adapter", args=(name,))
            if outcome.error is not None:
                return _error(400, outcome.error)
            info = outcome.info
        except ExpertWeaveError as e:
            return _error(400, str(e))
        except Exception as e:  # errors raised in the worker come back wrapped by vLLM
            return _error(400, lifetime.worker_message(e))
        self._publish(name, path)
        return {"adapter_name": name, **info}

    async def unload(self, name: str, timeout: float):
        registry = self.registry
        registry.unloading.add(name)
        try:
            await lifetime.unload_when_idle_async(self.engine, name, timeout)
        except AdapterBusyError as e:
            return _error(409, str(e), "ConflictError")
        finally:
            registry.unloading.discard(name)
        del registry.paths[name]
        self.models.base_model_paths[:] = [p for p in self.models.base_model_paths if p.name != name]
        return {"adapter_name": name, "unloaded": True}


def api_server_module():
    """The module whose build_and_serve builds and serves vLLM's app (vLLM 0.23 and 0.32 alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 0.32 deprecates the module, not the functions
        module = __import__(API_SERVER, fromlist=["build_and_serve"])
    return sys.modules[module.build_and_serve.__module__]


def add_front_end(module, front_end: ExpertWeaveFrontEnd) -> None:
    """Makes vLLM's build_and_serve add the front-end to the app it builds and initialise it with the app's
    state; our own process (the API server we start), so nothing else sees the change."""
    build_app, init_app_state = module.build_app, module.init_app_state

    def build_app_with_adapters(args, *rest, **kwargs):
        app = build_app(args, *rest, **kwargs)
        front_end.attach(app)
        return app

    async def init_app_state_with_adapters(engine_client, state, args, *rest, **kwargs):
        await init_app_state(engine_client, state, args, *rest, **kwargs)
        await front_end.init_state(engine_client, state, args)

    module.build_app = build_app_with_adapters
    module.init_app_state = init_app_state_with_adapters


def main(argv: list[str] | None = None) -> None:
    """`vllm serve`'s API server (argument parser, checks, run_server) with the ExpertWeave front-end."""
    import importlib.util

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_args = importlib.import_module(next(m for m in CLI_ARGS if importlib.util.find_spec(m) is not None))
    cli_env_setup()
    args = cli_args.make_arg_parser(FlexibleArgumentParser(description="expertweave serve")).parse_args(argv)
    cli_args.validate_parsed_serve_args(args)
    module = api_server_module()
    add_front_end(module, ExpertWeaveFrontEnd())
    uvloop.run(module.run_server(args))


def serve_command(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str],
                  max_adapters: int, adapter_slots: int | None, base_name: str | None) -> list[str]:
    """The API server's command line (python -m this module) for ExpertWeave."""
    config = {"expertweave": engine_config(BaseGeometry.from_checkpoint(base), adapters, max_adapters, adapter_slots)}
    defaults = []
    for key, value in platforms.current().engine_defaults().items():
        flag = "--" + key.replace("_", "-")
        if not any(arg == flag or arg.startswith(flag + "=") for arg in vllm_args):
            defaults += [flag, str(value)]
    return [sys.executable, "-m", __name__, "--model", base,
            "--served-model-name", base_name or Path(base).name, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(config), "--worker-extension-cls", WORKER_EXTENSION, *defaults,
            *admission.with_admission_args(vllm_args)]


def serve_environment(environ: dict[str, str]) -> dict[str, str]:
    """The server's environment: VLLM_PLUGINS is an allowlist of every plugin group, platform plugins
    included, so it is left unset when unset; a list the user gave gets our general plugin added."""
    env = dict(environ)
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    if "VLLM_PLUGINS" in env and GENERAL_PLUGIN not in allowed:
        env["VLLM_PLUGINS"] = ",".join(allowed + [GENERAL_PLUGIN])
    for key, value in platforms.current().engine_environment().items():
        env.setdefault(key, value)
    return env


def serve(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str], max_adapters: int = 8,
          adapter_slots: int | None = None, base_name: str | None = None) -> None:
    argv = serve_command(base, adapters, host, port, vllm_args, max_adapters, adapter_slots, base_name)
    os.execve(sys.executable, argv, serve_environment(dict(os.environ)))


if __name__ == "__main__":
    main()
