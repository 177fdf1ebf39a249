"""`expertweave serve`: vLLM's own OpenAI-compatible server with ESFT adapters as models.

vLLM's API-server code builds the app and runs it; this module adds, to the app it builds,
  GET  /v1/esft_adapters
  POST /v1/load_esft_adapter   {"adapter_name", "adapter_path"}        with --allow-runtime-loading only
  POST /v1/unload_esft_adapter {"adapter_name", "timeout"?}            (waits for the adapter's requests)
and an ASGI middleware (AdapterModelMiddleware) that turns `"model": "<adapter>"` into that request's
adapter on completions and chat completions, refuses it on every other route, and lists adapters in
/v1/models. On those two routes a top-level `"contrastive": {"alpha", "beta"}` decodes the adapter against
its base model (contrastive.py; the response carries x-esft-contrastive). It needs no endpoint plugin (vLLM 0.23 has no such plugin group) and leaves VLLM_PLUGINS as
the user set it, so platform plugins (vllm-ascend's) and other general plugins load. Adapter names are
not vLLM model names: a route the middleware does not rewrite answers them with vLLM's own 404.

This module is the HTTP driver of the engine's AdapterFrontEnd (frontend.py), which ExpertWeaveLLM drives
offline: the front-end owns the adapters' life cycle (catalogue, residency, leases, loads, evictions,
unloads, admission); this module reads requests, hands it what they ask and answers with the status its
errors call for (AdapterRoutes.refusal).
"""

import argparse
import asyncio
import importlib
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict

from fastapi import Request
from fastapi.responses import JSONResponse

from ...catalogue import AdapterCatalogue
from ...errors import AdapterBusyError, AdapterFileError, ConfinementError, ExpertWeaveError
from ...geometry import BaseGeometry
from ...residency import Residency
from . import admission, lifetime, patching, platforms
from .contrastive import (PARALLEL_REFUSAL, PROMPT_EMBEDS_REFUSAL, PROMPT_LOGPROBS_REFUSAL, STRUCTURED_REFUSAL,
                          variant_refusal)
from .engine import client_salt_problem, refuse_data_parallelism
from .launch import REFUSAL, ServerOptions
from .frontend import AdapterConflict, AdapterFrontEnd, AdapterNotFound, AdapterUnavailable
from .metrics import REFRESH_S, AdapterMetrics
from .workers import Workers

logger = logging.getLogger("expertweave")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
CLIENT_SETS = 'the server: name the adapter in "model" (and contrastive decoding in "contrastive")'
# The vLLM details of the front-end, 0.32 and 0.23 alike. API_SERVER re-exports build_and_serve, which
# calls build_app and init_app_state by their global names where it is defined (0.32: the module
# vllm.entrypoints.launchers.api_server.entry; 0.23: API_SERVER itself). vLLM's own argument parser and
# its checks live in the platform's CLI_ARGS module (one per vLLM line).
API_SERVER = "vllm.entrypoints.openai.api_server"


def _error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


_NOT_JSON = object()


def _json_value(raw: bytes):
    """The request's JSON value (an empty body is an empty object), or _NOT_JSON (vLLM answers it)."""
    try:
        return json.loads(raw or b"{}")
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, an integer past Python's digit limit
        return _NOT_JSON


def _json_object(raw: bytes):
    """The request's JSON object, or None when the body is something else."""
    body = _json_value(raw)
    return body if isinstance(body, dict) else None


class AdapterModelMiddleware:
    """ASGI middleware applying one rule to every POST body that is a JSON object, whatever its headers
    say: `"model": "<adapter>"` selects the adapter (its extra_args and a prefix-cache salt from its content
    hash, the client's own salt kept in front) on the routes that generate with SamplingParams
    (GENERATE_PATHS) and is refused with 400 on every other route; no route lets a client set the adapter
    arguments or the salt marker itself. vLLM then parses the body this middleware wrote, so the two cannot
    read one request two ways; a request whose headers could be read two ways (repeated Content-Type or
    Content-Length, a length that is not the body's, Transfer-Encoding beside a length) is refused.
    Responses name the adapter, and GET /v1/models lists the adapters with their hashes."""

    def __init__(self, app, routes: "AdapterRoutes"):
        self.app = app
        self.routes = routes

    async def __call__(self, scope, receive, send):
        front_end = self.routes.front_end
        if scope["type"] != "http" or front_end is None:
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            states = await front_end.states()
            return await self.app(scope, receive, self._listing_models(send, front_end, states))
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        raw = await _read_body(receive)
        problem = _header_problem(scope.get("headers") or [], len(raw))
        if problem is not None:
            return await _error(400, problem)(scope, receive, send)
        body = _json_value(raw)
        if body is _NOT_JSON:
            return await self.app(scope, _replay(raw, receive), send)
        if not isinstance(body, dict):  # vLLM 0.23's completions answer it with a 500
            return await _error(400, f"expected a JSON object, got {type(body).__name__}")(scope, receive, send)
        model = body.get("model")
        name = model if isinstance(model, str) and model != front_end.base_name and \
            await front_end.known(model) else None
        refusal = self._refusal(scope["path"], body, name, front_end.unloading(name))
        option = None
        if refusal is None and "contrastive" in body:
            refusal = self._contrastive_refusal(body, name)
            if refusal is None:
                try:
                    option = await front_end.contrastive(body.pop("contrastive"), name)
                except ValueError as e:
                    refusal = _error(400, str(e))
            raw = json.dumps(body).encode()
        if refusal is not None:
            return await refusal(scope, receive, send)
        if name is None:
            return await self.app(scope, _replay(raw, receive), send)
        try:
            lease = await front_end.acquire(name)
        except AdapterNotFound as e:
            return await _error(404, str(e), "NotFoundError")(scope, receive, send)
        except AdapterUnavailable as e:
            return await _error(503, str(e), "ServiceUnavailableError")(scope, receive, send)
        except ExpertWeaveError as e:
            return await _error(400, str(e))(scope, receive, send)
        try:  # the lease keeps the adapter on the device until the response has ended
            headers = lease.headers()
            if option is not None:
                if lease.content.variant:  # its files changed since the look above
                    return await _error(400, variant_refusal(name))(scope, receive, send)
                headers.append((b"x-esft-contrastive", f"alpha={option.alpha}, beta={option.beta}".encode()))
            body["vllm_xargs"], body["cache_salt"] = admission.request_fields(
                name, lease.content, option, body.get("vllm_xargs"), body.get("cache_salt"))
            body["model"] = front_end.base_name
            replay = _replay(json.dumps(body).encode(), receive)
            return await self.app(scope, replay, _renaming(send, front_end.base_name, name, headers))
        finally:
            front_end.release(name)

    @staticmethod
    def _refusal(path: str, body: dict, name: str | None, unloading: bool):
        xargs = body.get("vllm_xargs")
        problem = admission.client_args_problem(xargs, "vllm_xargs", CLIENT_SETS) if isinstance(xargs, dict) else None
        problem = problem or client_salt_problem(body.get("cache_salt"))
        if problem is not None:
            return _error(400, problem)
        if name is None:
            return None
        if path not in GENERATE_PATHS:
            return _error(400, f"{path} serves the base model only; ESFT adapter {name!r} is served on "
                               f"{' and '.join(GENERATE_PATHS)}")
        if unloading:
            return _error(409, f"adapter {name!r} is being unloaded", "ConflictError")
        problem = admission.client_args_problem(xargs, "vllm_xargs", CLIENT_SETS)
        if problem is not None:
            return _error(400, problem)
        if body.get("use_beam_search"):
            return _error(400, f"beam search runs outside ExpertWeave's per-step routing: it is not served for ESFT "
                               f"adapter {name!r}; sample instead (n, temperature, seed)")
        return None

    @staticmethod
    def _contrastive_refusal(body: dict, name: str | None):
        """The request's fields contrastive decoding cannot serve (vLLM reads them into its sampling parameters)."""
        if body.get("contrastive") is None or name is None:
            return None
        if body.get("prompt_embeds") is not None:
            return _error(400, PROMPT_EMBEDS_REFUSAL)
        if any(body.get(key) not in (None, 1) for key in ("n", "best_of")):
            return _error(400, PARALLEL_REFUSAL)
        echoed_logprobs = body.get("top_logprobs" if "messages" in body else "logprobs")  # vLLM's prompt logprobs
        if body.get("prompt_logprobs") is not None or (body.get("echo") and echoed_logprobs is not None):
            return _error(400, PROMPT_LOGPROBS_REFUSAL)
        response_format = body.get("response_format")
        if body.get("structured_outputs") is not None or (
                isinstance(response_format, dict) and response_format.get("type") not in (None, "text")):
            return _error(400, STRUCTURED_REFUSAL)
        return None

    @staticmethod
    def _listing_models(send, front_end: AdapterFrontEnd, states: dict[str, str]):
        """send, with every servable adapter added to a successful /v1/models answer as a card of its own:
        its tier (esft_state: device, loading, host or disk) and, on the device, its content hash."""
        start, chunks = None, []

        async def listing_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            raw = b"".join(chunks)
            listing = _json_object(raw) if start["status"] == 200 else None
            if listing is not None and isinstance(listing.get("data"), list) and listing["data"]:
                base = next((card for card in listing["data"] if card.get("id") == front_end.base_name),
                            listing["data"][0])
                for name, state in states.items():
                    content = front_end.residency.content(name)
                    listing["data"].append({**base, "id": name, "root": name, "parent": base.get("id"),
                                            "esft_state": state, "esft_sha256": content and content.sha256})
                raw = json.dumps(listing).encode()
            headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
            await send({**start, "headers": headers + [(b"content-length", str(len(raw)).encode())]})
            await send({"type": "http.response.body", "body": raw, "more_body": False})
        return listing_send


ONCE_ONLY = (b"content-type", b"content-length", b"transfer-encoding")


def _header_problem(headers: list[tuple[bytes, bytes]], body_length: int) -> str | None:
    """Why these request headers could be read two ways, or None."""
    seen: dict[bytes, list[bytes]] = {}
    for key, value in headers:
        seen.setdefault(key.lower(), []).append(value)
    for key in ONCE_ONLY:
        if len(seen.get(key, ())) > 1:
            return f"the {key.decode().title()} header is given {len(seen[key])} times: give it once"
    length = seen.get(b"content-length")
    if length is not None and seen.get(b"transfer-encoding"):
        return "Content-Length and Transfer-Encoding are both given: give one"
    if length is not None and length[0].strip() != str(body_length).encode():
        return f"Content-Length {length[0][:32].decode(errors='replace')!r} is not the body's length {body_length}"
    return None


def _replay(raw: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": raw, "more_body": False}
    return replay


def _renaming(send, base_name: str, name: str, headers: list[tuple[bytes, bytes]]):
    """send, with the base model's name in the response bodies replaced by the adapter's, and these
    headers added to the response."""
    base, adapter = json.dumps(base_name).encode(), json.dumps(name).encode()

    async def renaming_send(message):
        if message["type"] == "http.response.start":
            message["headers"] = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"] + headers
        elif message["type"] == "http.response.body":
            message["body"] = message.get("body", b"").replace(b'"model":' + base, b'"model":' + adapter) \
                .replace(b'"model": ' + base, b'"model": ' + adapter)
        await send(message)
    return renaming_send


class AdapterRoutes:
    """The HTTP driver of the engine's AdapterFrontEnd (frontend.py): the adapter routes and the middleware,
    added to the app vLLM's API server builds; every answer's status is chosen here, from the front-end's
    errors (refusal)."""

    def __init__(self):
        self.front_end: AdapterFrontEnd | None = None
        self.options = ServerOptions()
        self._refresher: asyncio.Task | None = None

    def attach(self, app, options: ServerOptions) -> None:
        self.options = options
        if app.middleware_stack is None:
            app.add_middleware(AdapterModelMiddleware, routes=self)
        else:  # vLLM 0.32's SageMaker bootstrap builds the stack in build_app: ours goes around it
            app.middleware_stack = AdapterModelMiddleware(app.middleware_stack, routes=self)
        app.add_api_route("/v1/esft_adapters", self.esft_adapters, methods=["GET"])
        if options.runtime_loading:  # otherwise the routes do not exist (404), as vLLM's LoRA routes
            app.add_api_route("/v1/load_esft_adapter", self.load_route, methods=["POST"])
            app.add_api_route("/v1/unload_esft_adapter", self.unload_route, methods=["POST"])

    async def init_state(self, engine_client, state, args) -> None:
        options = self.options
        residency = Residency(options.max_adapters, options.eviction_policy)
        self.front_end = AdapterFrontEnd(
            engine_client, Workers.of_engine_client(engine_client), BaseGeometry.from_checkpoint(args.model),
            AdapterCatalogue(options.adapter_root, options.catalogue), residency,
            AdapterMetrics(lambda: residency.entries), base_name=state.openai_serving_models.base_model_paths[0].name,
            adapter_root=options.adapter_root, wait_s=options.adapter_wait_s,
            host_budget_bytes=options.host_adapter_bytes)
        await self.front_end.start()
        self._refresher = asyncio.create_task(self.front_end.refresh_metrics(REFRESH_S))
        if options.warm_host_tier:
            await self.front_end.warm_host_tier()

    async def esft_adapters(self):
        """The adapters on the device, their content hashes and sizes, and the memory report; no server paths."""
        workers = self.front_end.workers
        adapters = {name: {k: v for k, v in asdict(listed).items() if k != "path"}
                    for name, listed in (await workers.adapters()).items()}
        memory = (await workers.memory_report()).to_json()
        return {"base_model": self.front_end.base_name, "adapters": adapters, "memory": memory}

    async def load_route(self, request: Request):
        body = _json_object(await request.body())
        if body is None:
            return _error(400, 'expected a JSON object {"adapter_name": str, "adapter_path": str}')
        name, path = body.get("adapter_name"), body.get("adapter_path")
        if path is None and self.options.adapter_root is not None:
            path = name  # under --adapter-root, an adapter may be named by its directory alone
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            return _error(400, 'expected {"adapter_name": str, "adapter_path": str}')
        try:
            loaded = await self.front_end.load(name, path)
        except Exception as e:  # errors raised in a worker come back wrapped by vLLM
            return self.refusal(e, path)
        return {"adapter_name": name, **loaded.summary()}

    async def unload_route(self, request: Request):
        body = _json_object(await request.body())
        if body is None:
            return _error(400, 'expected a JSON object {"adapter_name": str, "timeout": seconds}')
        name = body.get("adapter_name")
        if not isinstance(name, str):
            return _error(404, f"adapter {name!r} is not loaded", "NotFoundError")
        timeout = body.get("timeout", 600)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            return _error(400, f"timeout {timeout!r}: expected a number of seconds")
        try:
            await self.front_end.unload(name, float(timeout))
        except ExpertWeaveError as e:
            return self.refusal(e, None)
        return {"adapter_name": name, "unloaded": True}

    def refusal(self, error: Exception, path: str | None) -> JSONResponse:
        """The answer to a load or unload the front-end refused (path: the one a load was given)."""
        if isinstance(error, AdapterNotFound):
            return _error(404, str(error), "NotFoundError")
        if isinstance(error, (AdapterConflict, AdapterBusyError)):
            return _error(409, str(error), "ConflictError")
        if isinstance(error, ConfinementError):
            return _error(403, str(error), "PermissionDeniedError")
        if isinstance(error, AdapterFileError) and self.options.adapter_root is None:
            # the client may name any path: tell it nothing of the server's files
            return _error(400, f"{path}: no ESFT adapter this server can read there")
        if isinstance(error, ExpertWeaveError):
            return _error(400, self.front_end.public(getattr(error, "public_message", str(error))))
        return _error(400, self.front_end.public(lifetime.worker_message(error)))


def api_server_module():
    """The module whose build_and_serve builds and serves vLLM's app (vLLM 0.23 and 0.32 alike)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 0.32 deprecates the module, not the functions
        module = __import__(API_SERVER, fromlist=["build_and_serve"])
    return sys.modules[module.build_and_serve.__module__]


def add_front_end(module, routes: AdapterRoutes) -> None:
    """Makes vLLM's build_and_serve add the routes to the app it builds and initialise them with the app's
    state; our own process (the API server we start), so nothing else sees the change (patching.PATCHES)."""
    def with_routes(build_app):
        def build_app_with_adapters(args, *rest, **kwargs):
            app = build_app(args, *rest, **kwargs)
            routes.attach(app, ServerOptions.of(args))
            return app
        return build_app_with_adapters

    def with_state(init_app_state):
        async def init_app_state_with_adapters(engine_client, state, args, *rest, **kwargs):
            await init_app_state(engine_client, state, args, *rest, **kwargs)
            await routes.init_state(engine_client, state, args)
        return init_app_state_with_adapters

    patching.replace_method(f"{module.__name__}:build_app", with_routes)
    patching.replace_method(f"{module.__name__}:init_app_state", with_state)


def serve_environment(environ: dict[str, str]) -> dict[str, str]:
    """The engine's environment: the user's, VLLM_PLUGINS included as given (it filters every plugin group,
    vllm-ascend's platform plugin too, and ExpertWeave needs none), with the platform's defaults added."""
    env = dict(environ)
    for key, value in platforms.current().engine_environment().items():
        env.setdefault(key, value)
    return env


def serve_args(argv: list[str]) -> argparse.Namespace:
    """The API server's arguments, read once, by vLLM's own parser: the command line `expertweave serve` built
    (launch.serve_command), after this platform's engine defaults for what it does not give and with
    ExpertWeave's logits processors. Data parallelism, in any spelling that parser reads, is refused."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_args = importlib.import_module(platforms.current().CLI_ARGS)
    given = {arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
    defaults = [f"--{key.replace('_', '-')}={value}" for key, value in platforms.current().engine_defaults(given).items()]
    parser = cli_args.make_arg_parser(FlexibleArgumentParser(description="expertweave serve"))
    args = parser.parse_args(admission.with_processors_args([*defaults, *argv]))
    cli_args.validate_parsed_serve_args(args)
    refuse_data_parallelism("expertweave serve", vars(args), os.environ, flags=True)
    return args


def main(argv: list[str] | None = None) -> None:
    """`vllm serve`'s API server (argument parser, checks, run_server) with the ExpertWeave front-end. A start
    it refuses is one `error:` line and exit status 2, which `expertweave serve` passes on (launch.py)."""
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    os.environ.update(serve_environment(dict(os.environ)))  # before any engine process starts
    cli_env_setup()
    try:
        args = serve_args(sys.argv[1:] if argv is None else argv)
    except ExpertWeaveError as e:
        print(f"{REFUSAL}{e}", file=sys.stderr, flush=True)
        sys.exit(2)
    handler = logging.StreamHandler()  # loads and unloads, one line each: name, path, content hash
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s expertweave: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    module = api_server_module()
    add_front_end(module, AdapterRoutes())
    uvloop.run(module.run_server(args))


if __name__ == "__main__":
    main()
