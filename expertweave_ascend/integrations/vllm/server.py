"""`expertweave serve`: vLLM's OpenAI-compatible server with ESFT adapters as models.

A vLLM endpoint plugin (entry point `vllm.endpoint_plugins: expertweave_http`) adds
  POST /v1/load_esft_adapter   {"adapter_name", "adapter_path"}
  POST /v1/unload_esft_adapter {"adapter_name"}
  GET  /v1/esft_adapters
and an ASGI middleware that turns `"model": "<adapter>"` in completions and chat completions into
that request's adapter (SamplingParams.extra_args, plus a per-adapter prefix-cache salt), counts the
adapter's requests in flight so unload waits for them, and names the adapter in the responses.
Adapter names are registered as model names, so /v1/models lists them and unknown names get vLLM's
own 404.
"""

import asyncio
import json
import os
import sys
from pathlib import Path

from ...adapters import validate_adapter
from ...errors import ExpertWeaveError
from ...geometry import BaseGeometry
from . import compat
from .llm import WORKER_EXTENSION, engine_config

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
PLUGIN_NAMES = "expertweave,expertweave_http"  # the general plugin and this endpoint plugin


def _error(status: int, message: str, kind: str = "BadRequestError") -> "JSONResponse":
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


class AdapterRegistry:
    """The server's view of loaded adapters: names, paths, requests in flight, unloading."""

    def __init__(self, geometry: BaseGeometry, base_name: str):
        self.geometry = geometry
        self.base_name = base_name
        self.paths: dict[str, str] = {}
        self.in_flight: dict[str, int] = {}
        self.unloading: set[str] = set()
        self.changed = asyncio.Condition()


class AdapterModelMiddleware:
    """ASGI middleware mapping `"model": adapter` to the adapter's extra_args, and back in responses."""

    def __init__(self, app, routes: "ExpertWeaveRoutes"):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        registry = self.routes.registry
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
            xargs.pop(compat.ADAPTER_ARG, None)  # only the model name selects an adapter
            if name in registry.paths:
                if name in registry.unloading:
                    return await _error(409, f"adapter {name!r} is being unloaded", "ConflictError")(scope, receive, send)
                xargs[compat.ADAPTER_ARG] = name
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

        registry.in_flight[name] = registry.in_flight.get(name, 0) + 1
        try:
            await self.app(scope, replay, renaming_send)
        finally:
            registry.in_flight[name] -= 1
            async with registry.changed:
                registry.changed.notify_all()


class ExpertWeaveRoutes:
    """vLLM endpoint plugin (vllm.plugins.endpoint_plugins.interface.EndpointPlugin)."""

    name = "expertweave_http"
    required_tasks = None

    def __init__(self):
        self.registry: AdapterRegistry | None = None
        self.engine = None
        self.models = None

    def attach_router(self, app) -> None:
        from fastapi import Request

        app.add_middleware(AdapterModelMiddleware, routes=self)

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
            return await self.unload(name, float(body.get("timeout", 600)))

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
        for name, info in (await engine_client.collective_rpc("expertweave_list_adapters"))[0].items():
            self._publish(name, info["path"])

    def _publish(self, name: str, path: str) -> None:
        from vllm.entrypoints.openai.models.protocol import BaseModelPath

        self.registry.paths[name] = path
        self.models.base_model_paths.append(BaseModelPath(name=name, model_path=path))

    async def load(self, name: str, path: str):
        registry = self.registry
        if name in registry.paths or name == registry.base_name:
            return _error(400, f"adapter name {name!r} is already in use")
        try:
            validate_adapter(path, registry.geometry)
            info = (await self.engine.collective_rpc("expertweave_load_adapter", args=(name, path)))[0]
        except ExpertWeaveError as e:
            return _error(400, str(e))
        except Exception as e:  # errors raised in the worker come back wrapped by vLLM
            return _error(400, _worker_message(e))
        self._publish(name, path)
        return {"adapter_name": name, **info}

    async def unload(self, name: str, timeout: float):
        registry = self.registry
        registry.unloading.add(name)
        try:
            async with registry.changed:
                await asyncio.wait_for(registry.changed.wait_for(lambda: registry.in_flight.get(name, 0) == 0),
                                       timeout)
            await self.engine.collective_rpc("expertweave_unload_adapter", args=(name, 0.0))
        except asyncio.TimeoutError:
            return _error(409, f"adapter {name!r} still has requests in flight after {timeout} s", "ConflictError")
        finally:
            registry.unloading.discard(name)
        del registry.paths[name]
        self.models.base_model_paths[:] = [p for p in self.models.base_model_paths if p.name != name]
        return {"adapter_name": name, "unloaded": True}


def _worker_message(error: Exception) -> str:
    text = str(error)
    for line in reversed(text.splitlines()):
        if ": " in line:
            return line.strip()
    return text


def serve_command(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str],
                  max_adapters: int, adapter_slots: int | None, base_name: str | None) -> list[str]:
    """The `vllm serve` command line (as a python -m invocation) for ExpertWeave."""
    config = {"expertweave": engine_config(BaseGeometry.from_checkpoint(base), adapters, max_adapters, adapter_slots)}
    defaults = []
    for key, value in compat.engine_defaults().items():
        flag = "--" + key.replace("_", "-")
        if not any(arg == flag or arg.startswith(flag + "=") for arg in vllm_args):
            defaults += [flag, str(value)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", base,
            "--served-model-name", base_name or Path(base).name, "--host", host, "--port", str(port),
            "--additional-config", json.dumps(config), "--worker-extension-cls", WORKER_EXTENSION, *defaults,
            *vllm_args]


def serve(base: str, adapters: dict[str, str], host: str, port: int, vllm_args: list[str], max_adapters: int = 8,
          adapter_slots: int | None = None, base_name: str | None = None) -> None:
    argv = serve_command(base, adapters, host, port, vllm_args, max_adapters, adapter_slots, base_name)
    env = dict(os.environ)
    allowed = [p for p in env.get("VLLM_PLUGINS", "").split(",") if p]
    env["VLLM_PLUGINS"] = ",".join(dict.fromkeys(allowed + PLUGIN_NAMES.split(",")))
    for key, value in compat.engine_environment().items():
        env.setdefault(key, value)
    os.execve(sys.executable, argv, env)
