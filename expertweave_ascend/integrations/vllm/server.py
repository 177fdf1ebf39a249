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

Request lifetime belongs to the engine: the workers count each adapter's requests from the scheduler's
output (worker.py); unload asks them until the adapter is idle (lifetime.py). Which adapters are on the
device, and which are on their way in or out, is the residency's (residency.py); new requests for an
adapter being unloaded are refused here (409) and where vLLM's engine client registers each request
(admission.py), which also checks every ExpertWeave argument the request carries.
"""

import asyncio
import json
import logging
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

from ...adapters import check_adapter
from ...catalogue import AdapterCatalogue
from ...errors import AdapterBusyError, AdapterFileError, ConfinementError, ExpertWeaveError
from ...files import confined
from ...geometry import BaseGeometry
from ...residency import UNLOADING, Residency
from . import admission, agreement, lifetime, platforms
from ...contrastive import parse_contrastive
from .contrastive import (PARALLEL_REFUSAL, PROMPT_EMBEDS_REFUSAL, PROMPT_LOGPROBS_REFUSAL, STRUCTURED_REFUSAL,
                          contrastive_args, variant_refusal)
from .engine import ADAPTER_ARG, adapter_cache_salt, client_salt_problem, contrastive_refusal
from .variants import VARIANT_ARG
from .metrics import REFRESH_S, AdapterMetrics
from .tiering import AdapterEntry, AdapterLoadFailed, AdapterNotFound, AdapterUnavailable, TieredAdapters

logger = logging.getLogger("expertweave")

GENERATE_PATHS = ("/v1/completions", "/v1/chat/completions")
# The vLLM details of the front-end, 0.32 and 0.23 alike. API_SERVER re-exports build_and_serve, which
# calls build_app and init_app_state by their global names where it is defined (0.32: the module
# vllm.entrypoints.launchers.api_server.entry; 0.23: API_SERVER itself). vLLM's own argument parser and
# its checks live in the platform's CLI_ARGS module (one per vLLM line).
API_SERVER = "vllm.entrypoints.openai.api_server"


def _error(status: int, message: str, kind: str = "BadRequestError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": status}},
                        status_code=status)


class AdapterRegistry:
    """The server's base model, and its view of the residency (residency.py owns which adapters are on the
    device): the adapters on the device, name -> path, content hash and kind."""

    def __init__(self, geometry: BaseGeometry, base_name: str, residency: Residency):
        self.geometry = geometry
        self.base_name = base_name
        self.residency = residency

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        return self.residency.entries


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

    def __init__(self, app, front_end: "ExpertWeaveFrontEnd"):
        self.app = app
        self.front_end = front_end

    async def __call__(self, scope, receive, send):
        registry = self.front_end.registry
        if scope["type"] != "http" or registry is None:
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            states = await self.front_end.tiers.states()
            return await self.app(scope, receive, self._listing_models(send, registry, states))
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
        name = model if isinstance(model, str) and model != registry.base_name and \
            await self.front_end.tiers.known(model) else None
        refusal = self._refusal(scope["path"], body, name, registry.residency.states.get(name) == UNLOADING)
        option = None
        if refusal is None and "contrastive" in body:
            refusal, option = self.front_end.contrastive(body.pop("contrastive"), name, body)
            raw = json.dumps(body).encode()
            if refusal is None and option is not None and await self.front_end.tiers.tunes_non_experts(name):
                refusal = _error(400, variant_refusal(name))
        if refusal is not None:
            return await refusal(scope, receive, send)
        if name is None:
            return await self.app(scope, _replay(raw, receive), send)
        tiers = self.front_end.tiers
        try:
            lease = await tiers.acquire(name)
        except AdapterNotFound as e:
            return await _error(404, str(e), "NotFoundError")(scope, receive, send)
        except AdapterLoadFailed as e:
            return await _error(400, str(e))(scope, receive, send)
        except AdapterUnavailable as e:
            return await _error(503, str(e), "ServiceUnavailableError")(scope, receive, send)
        try:  # the lease keeps the adapter on the device until the response has ended
            headers = lease.headers()
            if option is not None:
                if lease.entry.variant:  # its files changed since the look above
                    return await _error(400, variant_refusal(name))(scope, receive, send)
                headers.append((b"x-esft-contrastive", f"alpha={option.alpha}, beta={option.beta}".encode()))
            body["vllm_xargs"] = {**(body.get("vllm_xargs") or {}), ADAPTER_ARG: name,
                                  **({VARIANT_ARG: name} if lease.entry.variant else {}),
                                  **(contrastive_args(option) if option is not None else {})}
            body["cache_salt"] = adapter_cache_salt(lease.entry.sha256, body.get("cache_salt"))
            body["model"] = registry.base_name
            replay = _replay(json.dumps(body).encode(), receive)
            return await self.app(scope, replay, _renaming(send, registry.base_name, name, headers))
        finally:
            tiers.release(name)

    @staticmethod
    def _refusal(path: str, body: dict, name: str | None, unloading: bool):
        xargs = body.get("vllm_xargs")
        if isinstance(xargs, dict):
            for arg in xargs:
                if isinstance(arg, str) and arg.startswith(admission.PREFIX):
                    return _error(400, f"vllm_xargs.{arg} is set by the server: name the adapter in \"model\" "
                                       "(and contrastive decoding in \"contrastive\")")
        problem = client_salt_problem(body.get("cache_salt"))
        if problem is not None:
            return _error(400, problem)
        if name is None:
            return None
        if path not in GENERATE_PATHS:
            return _error(400, f"{path} serves the base model only; ESFT adapter {name!r} is served on "
                               f"{' and '.join(GENERATE_PATHS)}")
        if unloading:
            return _error(409, f"adapter {name!r} is being unloaded", "ConflictError")
        if xargs is not None and not isinstance(xargs, dict):
            return _error(400, "vllm_xargs must be an object")
        if body.get("use_beam_search"):
            return _error(400, f"beam search runs outside ExpertWeave's per-step routing: it is not served for ESFT "
                               f"adapter {name!r}; sample instead (n, temperature, seed)")
        return None

    @staticmethod
    def _listing_models(send, registry: AdapterRegistry, states: dict[str, str]):
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
                base = next((card for card in listing["data"] if card.get("id") == registry.base_name),
                            listing["data"][0])
                for name, state in states.items():
                    entry = registry.adapters.get(name)
                    listing["data"].append({**base, "id": name, "root": name, "parent": base.get("id"),
                                            "esft_state": state, "esft_sha256": entry and entry.sha256})
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


class ExpertWeaveFrontEnd:
    """The adapter routes and middleware, added to the app vLLM's API server builds."""

    def __init__(self):
        self.registry: AdapterRegistry | None = None
        self.engine = None
        self.options = ServerOptions()
        self.metrics: AdapterMetrics | None = None
        self.tiers: TieredAdapters | None = None
        self._refresher: asyncio.Task | None = None

    def attach(self, app, options: ServerOptions) -> None:
        self.options = options
        self.metrics = AdapterMetrics(lambda: self.registry.adapters if self.registry is not None else ())
        if app.middleware_stack is None:
            app.add_middleware(AdapterModelMiddleware, front_end=self)
        else:  # vLLM 0.32's SageMaker bootstrap builds the stack in build_app: ours goes around it
            app.middleware_stack = AdapterModelMiddleware(app.middleware_stack, front_end=self)
        app.add_api_route("/v1/esft_adapters", self.esft_adapters, methods=["GET"])
        if options.runtime_loading:  # otherwise the routes do not exist (404), as vLLM's LoRA routes
            app.add_api_route("/v1/load_esft_adapter", self.load_route, methods=["POST"])
            app.add_api_route("/v1/unload_esft_adapter", self.unload_route, methods=["POST"])

    async def esft_adapters(self):
        """The adapters on the device, their content hashes and sizes, and the memory report; no server paths."""
        adapters = {name: {k: v for k, v in info.items() if k != "path"}
                    for name, info in (await self.engine.collective_rpc("expertweave_list_adapters"))[0].items()}
        memory = (await self.engine.collective_rpc("expertweave_memory_report"))[0]
        return {"base_model": self.registry.base_name, "adapters": adapters, "memory": memory}

    async def load_route(self, request: Request):
        body = _json_object(await request.body())
        if body is None:
            return _error(400, 'expected a JSON object {"adapter_name": str, "adapter_path": str}')
        name, path = body.get("adapter_name"), body.get("adapter_path")
        if path is None and self.options.adapter_root is not None:
            path = name  # under --adapter-root, an adapter may be named by its directory alone
        if not isinstance(name, str) or not isinstance(path, str) or not path:
            return _error(400, 'expected {"adapter_name": str, "adapter_path": str}')
        return await self.load(name, path)

    async def unload_route(self, request: Request):
        body = _json_object(await request.body())
        if body is None:
            return _error(400, 'expected a JSON object {"adapter_name": str, "timeout": seconds}')
        name = body.get("adapter_name")
        if not isinstance(name, str) or name not in self.registry.adapters:
            return _error(404, f"adapter {name!r} is not loaded", "NotFoundError")
        timeout = body.get("timeout", 600)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < float("inf"):
            return _error(400, f"timeout {timeout!r}: expected a number of seconds")
        return await self.unload(name, float(timeout))

    async def init_state(self, engine_client, state, args) -> None:
        self.engine = engine_client
        models = state.openai_serving_models
        options = self.options
        catalogue = AdapterCatalogue(options.adapter_root, options.catalogue)
        residency = Residency(options.max_adapters, options.eviction_policy)
        self.registry = AdapterRegistry(BaseGeometry.from_checkpoint(args.model), models.base_model_paths[0].name,
                                        residency)
        self.tiers = TieredAdapters(self, catalogue, residency, options.adapter_wait_s, options.host_adapter_bytes)
        admission.install(engine_client, self._admit)
        for name, info in (await engine_client.collective_rpc("expertweave_list_adapters"))[0].items():
            residency.add_resident(name, AdapterEntry(info["path"], info["sha256"], info["variant"]))
        self._refresher = asyncio.create_task(self.refresh_metrics())
        if options.warm_host_tier:
            await self.tiers.warm_host_tier()

    async def refresh_metrics(self) -> None:
        """Fetches the workers' figures for /metrics every REFRESH_S seconds while the engine answers."""
        while True:
            try:
                figures = (await self.engine.collective_rpc("expertweave_metrics"))[0]
            except Exception as e:  # the engine is gone; the server is stopping
                logger.info("ExpertWeave: metrics no longer refreshed: %s", lifetime.worker_message(e))
                return
            self.metrics.update(figures, self.registry.base_name)
            await asyncio.sleep(REFRESH_S)

    def _admit(self, name: str) -> admission.Admitted:
        """The adapter as requests for it may start now (vLLM's engine client asks as it admits each), or
        ValueError saying why they may not."""
        entry = self.registry.adapters.get(name)
        if entry is None:
            raise ValueError(f"adapter {name!r} is not loaded")
        if not self.registry.residency.admits(name):
            raise ValueError(f"adapter {name!r} is being unloaded")
        return admission.Admitted(entry.sha256, entry.variant)

    def contrastive(self, value, name: str | None, body: dict):
        """(refusal, option) for a request's "contrastive" field (null: plain decoding)."""
        if value is None:
            return None, None
        try:
            option = parse_contrastive(value)
        except ValueError as e:
            return _error(400, str(e)), None
        if name is None:
            return _error(400, "contrastive decoding contrasts an adapter with its base model: set \"model\" to an "
                               f"ESFT adapter (the base model is {self.registry.base_name!r})"), None
        if body.get("prompt_embeds") is not None:
            return _error(400, PROMPT_EMBEDS_REFUSAL), None
        if any(body.get(key) not in (None, 1) for key in ("n", "best_of")):
            return _error(400, PARALLEL_REFUSAL), None
        echoed_logprobs = body.get("top_logprobs" if "messages" in body else "logprobs")  # vLLM's prompt logprobs
        if body.get("prompt_logprobs") is not None or (body.get("echo") and echoed_logprobs is not None):
            return _error(400, PROMPT_LOGPROBS_REFUSAL), None
        response_format = body.get("response_format")
        if body.get("structured_outputs") is not None or (
                isinstance(response_format, dict) and response_format.get("type") not in (None, "text")):
            return _error(400, STRUCTURED_REFUSAL), None
        refusal = contrastive_refusal(self.engine.vllm_config)
        if refusal is not None:
            return _error(400, refusal), None
        return None, option

    def public(self, message: str) -> str:
        """An error message fit for a client: without the adapter root's path."""
        return _within(self.options.adapter_root, message)

    async def load(self, name: str, path: str):
        registry = self.registry
        problem = adapter_name_problem(name)
        if problem is None and (name in registry.residency.states or name == registry.base_name):
            problem = f"adapter name {name!r} is already in use"
        if problem is not None:
            return _error(400, problem)
        root = self.options.adapter_root
        try:
            # Reading files may block (a slow disk, a network mount): never on the event loop.
            resolved = await asyncio.to_thread(self._checked_path, path)
        except ExpertWeaveError as e:
            return self._load_refusal(name, path, e)
        refusal = await self.tiers.reserve_row(name)  # the name and a row are taken until the load ends
        if refusal is not None:
            return _error(409, refusal, "ConflictError")
        entry = None
        try:
            with self.metrics.timed(self.metrics.load_seconds):
                outcome = agreement.check_load(name, await self.engine.collective_rpc(
                    "expertweave_load_adapter", args=(name, str(resolved))))
            if outcome.roll_back:
                await self.engine.collective_rpc("expertweave_discard_adapter", args=(name,))
            if outcome.error is not None:
                logger.info("ExpertWeave: adapter %r not loaded: %s", name, outcome.error)
                return _error(400, _within(root, outcome.public_error or outcome.error))
            entry = AdapterEntry(path, outcome.info["sha256"], outcome.info["variant"])
        except ExpertWeaveError as e:
            return self._load_refusal(name, path, e)
        except Exception as e:  # errors raised in the worker come back wrapped by vLLM
            return _error(400, _within(root, lifetime.worker_message(e)))
        finally:
            registry.residency.end_load(name, entry)
        registry.residency.use(name).pinned = True  # loaded by hand: evicted never, unloaded by hand
        self.metrics.loads[name] += 1
        logger.info("ExpertWeave: loaded adapter %r from %s (sha256 %s, %d experts)", name, resolved,
                    outcome.info["sha256"], outcome.info["experts"])
        return {"adapter_name": name, **outcome.info}

    def _load_refusal(self, name: str, path: str, error: ExpertWeaveError) -> JSONResponse:
        """The answer to a load the adapter's files or the workers refused."""
        logger.info("ExpertWeave: adapter %r not loaded: %s", name, error)
        root = self.options.adapter_root
        if isinstance(error, ConfinementError):
            return _error(403, str(error), "PermissionDeniedError")
        if isinstance(error, AdapterFileError) and root is None:  # the client may name any path: tell it nothing
            return _error(400, f"{path}: no ESFT adapter this server can read there")  # of the server's files
        return _error(400, _within(root, getattr(error, "public_message", str(error))))

    def _checked_path(self, path: str) -> Path:
        """The adapter directory to load: inside --adapter-root when one is set, and a valid adapter."""
        root = self.options.adapter_root
        resolved = confined(Path(root), path) if root is not None else Path(path)
        check_adapter(resolved, self.registry.geometry)  # the workers' load reads and checks the data
        return resolved

    async def unload(self, name: str, timeout: float):
        residency = self.registry.residency
        state = residency.states.get(name)
        if not residency.begin_leave(name, UNLOADING):  # on its way out already (the route answered 404 for others)
            what = "already being unloaded" if state == UNLOADING else "being evicted"
            return _error(409, f"adapter {name!r} is {what}", "ConflictError")
        entry = residency.entries[name]
        try:
            with self.metrics.timed(self.metrics.unload_seconds):
                await lifetime.unload_when_idle_async(self.engine, name, timeout, lambda: residency.use(name).leases)
        except AdapterBusyError as e:
            residency.end_leave(name, left=False)
            return _error(409, str(e), "ConflictError")
        except BaseException:
            residency.end_leave(name, left=False)
            raise
        residency.end_leave(name, left=True)
        self.tiers.changed()
        self.metrics.unloads.inc()
        self.metrics.forget(name)
        logger.info("ExpertWeave: unloaded adapter %r (sha256 %s)", name, entry.sha256)
        return {"adapter_name": name, "unloaded": True}


MAX_NAME = 128


def adapter_name_problem(name: str) -> str | None:
    """Why the server could not serve an adapter under this name, or None."""
    if not name or len(name) > MAX_NAME:
        return f"adapter name {name[:MAX_NAME]!r}: expected 1 to {MAX_NAME} characters"
    if not name.isprintable() or name != name.strip():
        return f"adapter name {name!r}: control characters and surrounding spaces are not allowed"
    return None


def _within(root: str | None, message: str) -> str:
    """An error message with the adapter root's path left out, so answers do not show the server's layout."""
    if root is None:
        return message
    return message.replace(str(Path(root).resolve()) + "/", "").replace(str(Path(root)) + "/", "")


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
        front_end.attach(app, ServerOptions.of(args))
        return app

    async def init_app_state_with_adapters(engine_client, state, args, *rest, **kwargs):
        await init_app_state(engine_client, state, args, *rest, **kwargs)
        await front_end.init_state(engine_client, state, args)

    module.build_app = build_app_with_adapters
    module.init_app_state = init_app_state_with_adapters


def main(argv: list[str] | None = None) -> None:
    """`vllm serve`'s API server (argument parser, checks, run_server) with the ExpertWeave front-end."""
    import importlib

    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_args = importlib.import_module(platforms.current().CLI_ARGS)
    cli_env_setup()
    handler = logging.StreamHandler()  # loads and unloads, one line each: name, path, content hash
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s expertweave: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    args = cli_args.make_arg_parser(FlexibleArgumentParser(description="expertweave serve")).parse_args(argv)
    cli_args.validate_parsed_serve_args(args)
    module = api_server_module()
    add_front_end(module, ExpertWeaveFrontEnd())
    uvloop.run(module.run_server(args))


if __name__ == "__main__":
    main()
