"""The front-end's one rule for every HTTP route, through the real ASGI middleware: what reaches vLLM's
app (here an ASGI app that records what it receives, standing in for the app vLLM builds) for each
request, and what the client gets back. The real server runs the same middleware in test_server.py."""

import asyncio
import json

import pytest

pytest.importorskip("vllm")

from prometheus_client import CollectorRegistry  # noqa: E402

from expertweave_ascend.catalogue import AdapterCatalogue  # noqa: E402
from expertweave_ascend.integrations.vllm.engine import SALT_MARKER, adapter_cache_salt  # noqa: E402
from expertweave_ascend.integrations.vllm.metrics import AdapterMetrics  # noqa: E402
from expertweave_ascend.integrations.vllm.frontend import AdapterFrontEnd, adapter_name_problem  # noqa: E402
from expertweave_ascend.integrations.vllm.server import AdapterModelMiddleware  # noqa: E402
from expertweave_ascend.residency import UNLOADING, Content, Residency  # noqa: E402

LAW = Content("adapters/law", "1" * 64)
LAW_RETRAINED = Content("adapters/law-v2", "2" * 64)


class RecordingApp:
    """Answers every request with {"model": <the model it was asked for>} and records the request body."""

    def __init__(self):
        self.bodies = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        body = json.loads(message["body"] or b"{}")
        self.bodies.append(body)
        answer = json.dumps({"model": body.get("model"), "object": "text_completion"}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(answer))]})
        await send({"type": "http.response.body", "body": answer})


class Routes:
    """The server's routes over a front-end with these adapters on the device, nothing else in its catalogue
    and no engine (nothing here reaches one)."""

    def __init__(self, adapters):
        residency = Residency(8)
        for name, content in adapters.items():
            residency.add_resident(name, content)
        self.front_end = AdapterFrontEnd(None, None, None, AdapterCatalogue(), residency,
                                         AdapterMetrics(lambda: residency.entries, CollectorRegistry()),
                                         base_name="base", wait_s=1.0)


def post(adapters: dict, path: str, body) -> tuple[int, dict, list]:
    app = RecordingApp()
    middleware = AdapterModelMiddleware(app, Routes(adapters))
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")]}
    asyncio.run(middleware(scope, receive, send))
    status = sent[0]["status"]
    answer = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    return status, answer, app.bodies


def test_an_adapter_request_reaches_vllm_as_the_base_with_the_adapter_and_its_salt():
    status, answer, [seen] = post({"law": LAW}, "/v1/completions", {"model": "law", "prompt": "p"})
    assert status == 200 and answer["model"] == "law"
    assert seen["model"] == "base" and seen["vllm_xargs"] == {"esft_adapter": "law"}
    assert seen["cache_salt"] == f"{SALT_MARKER}{'1' * 32}"


def test_the_salt_follows_the_content_and_keeps_the_clients_salt():
    _, _, [old] = post({"law": LAW}, "/v1/chat/completions", {"model": "law", "messages": []})
    _, _, [new] = post({"law": LAW_RETRAINED}, "/v1/chat/completions", {"model": "law", "messages": []})
    _, _, [same_bytes] = post({"law-copy": LAW}, "/v1/completions", {"model": "law-copy", "prompt": "p"})
    assert old["cache_salt"] != new["cache_salt"], "different bytes under one name must not share KV"
    assert same_bytes["cache_salt"] == old["cache_salt"]
    _, _, [tenant_a] = post({"law": LAW}, "/v1/completions", {"model": "law", "prompt": "p", "cache_salt": "tenant-a"})
    _, _, [tenant_b] = post({"law": LAW}, "/v1/completions", {"model": "law", "prompt": "p", "cache_salt": "tenant-b"})
    assert tenant_a["cache_salt"] == "tenant-a" + old["cache_salt"] != tenant_b["cache_salt"]


@pytest.mark.parametrize("body, problem", [
    ({"model": "base", "cache_salt": f"{SALT_MARKER}{'1' * 32}"}, f"cache_salt may not contain {SALT_MARKER!r}"),
    ({"model": "law", "cache_salt": "x" * 91}, "cache_salt is 91 characters; with an ESFT adapter it may have at most 90"),
    ({"model": "base", "vllm_xargs": {"esft_adapter": "law"}}, "vllm_xargs.esft_adapter is set by the server"),
    ({"model": "law", "vllm_xargs": "law"}, "vllm_xargs must be an object"),
])
def test_clients_cannot_forge_an_adapter_or_its_salt(body, problem):
    status, answer, seen = post({"law": LAW}, "/v1/completions", {"prompt": "p", **body})
    assert status == 400 and problem in answer["error"]["message"] and not seen


def test_other_routes_refuse_adapter_names_and_pass_the_base_through():
    status, answer, seen = post({"law": LAW}, "/v1/responses", {"model": "law", "input": "hi"})
    assert status == 400 and not seen
    assert answer["error"]["message"] == ("/v1/responses serves the base model only; ESFT adapter 'law' is served "
                                          "on /v1/completions and /v1/chat/completions")
    status, _, [seen] = post({"law": LAW}, "/v1/responses", {"model": "base", "input": "hi"})
    assert status == 200 and "vllm_xargs" not in seen and "cache_salt" not in seen


@pytest.mark.parametrize("body, kind", [(b"[1, 2]", "list"), (b'"law"', "str"), (b"7", "int")])
def test_json_that_is_not_an_object_is_refused_before_vllm(body, kind):
    """vLLM 0.23's completions answer such a body with a 500 and a traceback; every route takes an object."""
    status, answer, seen = post({"law": LAW}, "/v1/completions", body)
    assert status == 400 and not seen
    assert answer["error"]["message"] == f"expected a JSON object, got {kind}"


@pytest.mark.parametrize("body", [b"[" * 100_000 + b"]" * 100_000, b"{not json"])
def test_bodies_that_are_not_json_go_to_vllm_untouched(body):
    seen = []

    async def app_receiving_raw(scope, receive, send):
        seen.append((await receive())["body"])
        await send({"type": "http.response.start", "status": 400, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    middleware = AdapterModelMiddleware(app_receiving_raw, Routes({"law": LAW}))

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        pass

    asyncio.run(middleware({"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send))
    assert seen == [body]


def test_a_request_for_an_adapter_being_unloaded_is_409():
    routes = Routes({"law": LAW})
    assert routes.front_end.residency.begin_leave("law", UNLOADING)
    app = RecordingApp()
    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps({"model": "law", "prompt": "p"}).encode()}

    async def send(message):
        sent.append(message)

    asyncio.run(AdapterModelMiddleware(app, routes)(
        {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}, receive, send))
    assert sent[0]["status"] == 409 and not app.bodies


@pytest.mark.parametrize("name", ["law", "deepseek-ai/ESFT-law", "law@v2", "a\\b", "é" * 128])
def test_names_the_server_can_serve(name):
    assert adapter_name_problem(name) is None
    assert len(adapter_cache_salt(LAW.sha256, None)) <= 128  # the salt never depends on the name


@pytest.mark.parametrize("name, problem", [
    ("", "expected 1 to 128 characters"), ("x" * 129, "expected 1 to 128 characters"),
    ("law\x00", "control characters"), ("law\n", "control characters"), (" law", "surrounding spaces"),
])
def test_names_the_server_could_not_serve_are_refused(name, problem):
    assert problem in adapter_name_problem(name)


def post_with_headers(headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[int, dict, list]:
    app = RecordingApp()
    middleware = AdapterModelMiddleware(app, Routes({"law": LAW}))
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    asyncio.run(middleware(scope, receive, send))
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:])), app.bodies


FORGED = json.dumps({"model": "base", "prompt": "p", "vllm_xargs": {"esft_adapter": "law"}}).encode()
JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize("headers, problem", [
    ([JSON, (b"content-type", b"text/plain")], "the Content-Type header is given 2 times"),
    ([(b"Content-Type", b"text/plain"), JSON], "the Content-Type header is given 2 times"),
    ([JSON, (b"content-length", b"%d" % len(FORGED)), (b"content-length", b"%d" % len(FORGED))],
     "the Content-Length header is given 2 times"),
    ([JSON, (b"content-length", b"%d" % len(FORGED)), (b"transfer-encoding", b"chunked")],
     "Content-Length and Transfer-Encoding are both given"),
    ([JSON, (b"content-length", b"3")], f"Content-Length '3' is not the body's length {len(FORGED)}"),
])
def test_headers_that_could_be_read_two_ways_are_refused(headers, problem):
    """The adapter middleware once read the last Content-Type and vLLM the first: a JSON body sent as JSON then
    as text skipped the middleware and its vllm_xargs reached the engine (the adapter under the base's name)."""
    status, answer, seen = post_with_headers(headers, FORGED)
    assert status == 400 and not seen
    assert answer["error"]["message"].startswith(problem)


@pytest.mark.parametrize("content_type", [b"text/plain", b"application/x-www-form-urlencoded",
                                          b"application/vnd.api+json", b"APPLICATION/JSON; charset=utf-8"])
def test_every_json_object_body_meets_the_rule_whatever_its_content_type_says(content_type):
    status, answer, seen = post_with_headers([(b"content-type", content_type)], FORGED)
    assert status == 400 and not seen
    assert "vllm_xargs.esft_adapter is set by the server" in answer["error"]["message"]
    body = json.dumps({"model": "law", "prompt": "p"}).encode()
    status, answer, [seen] = post_with_headers([(b"content-type", content_type)], body)
    assert status == 200 and seen["vllm_xargs"] == {"esft_adapter": "law"} and answer["model"] == "law"


@pytest.mark.parametrize("arg", ["esft_pair", "esft_variant", "esft_contrastive_alpha", "esft_anything"])
def test_no_expertweave_argument_passes_from_a_client(arg):
    status, answer, seen = post({"law": LAW}, "/v1/completions", {"model": "law", "prompt": "p",
                                                                   "vllm_xargs": {arg: ["x"]}})
    assert status == 400 and not seen and f"vllm_xargs.{arg} is set by the server" in answer["error"]["message"]


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "p"}),
                                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "p"}]})])
def test_beam_search_for_an_adapter_is_refused_not_served_by_the_base(path, body):
    """vLLM's beam search builds its own sampling parameters without the request's extra_args: it would run
    the base model and answer under the adapter's name."""
    status, answer, seen = post({"law": LAW}, path, {"model": "law", "use_beam_search": True, "n": 2, **body})
    assert status == 400 and not seen
    assert answer["error"]["message"].startswith("beam search runs outside ExpertWeave's per-step routing")
    status, _, [seen] = post({"law": LAW}, path, {"model": "base", "use_beam_search": True, "n": 2, **body})
    assert status == 200 and seen["use_beam_search"]


def test_a_metrics_scrape_makes_no_engine_call():
    """On 0071847 each scrape cost three engine calls (a scrape flood tripled a completion's latency): the
    front-end here has no engine at all, and a scrape still reaches the app with the series collected."""
    app = RecordingApp()
    routes = Routes({"law": LAW})
    front_end = routes.front_end
    front_end.metrics.hits["law"] += 2
    front_end.metrics.hits["gone"] += 5  # an adapter no longer on the device shows no series
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    for _ in range(100):
        asyncio.run(AdapterModelMiddleware(app, routes)(
            {"type": "http", "method": "GET", "path": "/metrics", "headers": []}, receive, send))
    assert front_end.engine is None and front_end.workers is None and len(app.bodies) == 100
    samples = {(m.name, s.labels.get("adapter")): s.value for m in front_end.metrics.collect() for s in m.samples}
    assert samples[("expertweave_adapter_hits", "law")] == 2 and ("expertweave_adapter_hits", "gone") not in samples
