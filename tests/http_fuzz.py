"""Random requests over every route a server answers, with fields, header shapes and name lengths a client
may send: each must get an answer below 500, and the server must keep serving (test_server.py and
test_server_tiering.py run it on a server with runtime loading and one with an adapter root)."""

import http.client
import json
import random
from collections import Counter
from urllib.parse import urlsplit

ROUTES = ("/v1/completions", "/v1/completions", "/v1/chat/completions", "/v1/chat/completions",
          "/v1/load_esft_adapter", "/v1/unload_esft_adapter", "/tokenize", "/v1/responses", "/v1/embeddings")
GETS = ("/v1/models", "/v1/esft_adapters", "/metrics", "/health")
LONG = ("x" * 300, "x" * 5000, "é" * 200)
WEIRD = ("", "a\x00b", "../etc", "/etc", "..", ".", "law/..", " law", "law\n", "CON", "%2e%2e")


def _values(names: list[str], paths: list[str]) -> dict[str, list]:
    models = [*names, "base", *LONG, *WEIRD, 5, None, [], {}, True]
    return {
        "model": models,
        "prompt": ["hello", "", 5, None, [1, 2, 3], [[1, 2]], [-1], "x" * 2000, {"a": 1}],
        "messages": [[{"role": "user", "content": "hi"}], [], "hi", [{"role": "x"}], None, [{"content": 5}]],
        "max_tokens": [1, 2, 0, -1, "x", 2 ** 70, 10 ** 9, None, 1.5],
        "temperature": [0, 1, -1, "x", 1e308],
        "n": [1, 2, 0, -1, 10 ** 6, "2"],
        "best_of": [1, 2, 0],
        "use_beam_search": [True, False, "yes"],
        "seed": [1, -1, 2 ** 70, "x"],
        "stream": [False, True, "x"],
        "logprobs": [None, 1, 5, -1, True],
        "echo": [True, False],
        "prompt_logprobs": [None, 1, -1],
        "cache_salt": [None, "", "tenant", "~esft:" + "0" * 32, "x" * 200, 5],
        "vllm_xargs": [None, {}, {"esft_adapter": "law"}, {"esft_pair": ["x"]}, "x", {"a": [1]}, {"esft_x": 1}],
        "contrastive": [None, {}, {"alpha": 0.5, "beta": 0.1}, {"alpha": "x"}, 5, {"alpha": 2, "beta": -1}],
        "response_format": [None, {"type": "json_object"}, {"type": "text"}, "x"],
        "adapter_name": [*names, *LONG, *WEIRD, 5, None],
        "adapter_path": [*paths, *LONG, *WEIRD, "/nonexistent", "/proc/self/root", 5, None],
        "timeout": [0, 0.1, -1, "x", 1e308, None],
        "input": ["hello", 5, None],
    }


def _body(rng: random.Random, values: dict[str, list]) -> bytes:
    body = {key: rng.choice(options) for key, options in values.items() if rng.random() < 0.35}
    body.setdefault("max_tokens", rng.choice([1, 2]))
    raw = json.dumps(body)
    shape = rng.random()
    if shape < 0.05:
        return raw.replace("1e+308", "NaN").replace("10000000000", "Infinity").encode()
    if shape < 0.08:
        return b"[" * 5000 + b"]" * 5000
    if shape < 0.10:
        return b'{"model": "\xff\xfe"}'
    if shape < 0.12:
        return b'{"model": ' + b"9" * 5000 + b"}"
    if shape < 0.15:
        return raw.encode()[: len(raw) // 2]
    return raw.encode()


def _headers(rng: random.Random, length: int) -> list[tuple[str, str]]:
    shape = rng.random()
    content_type = [("Content-Type", "application/json")]
    if shape < 0.05:
        content_type += [("Content-Type", "text/plain")]
    elif shape < 0.10:
        content_type = [("Content-Type", rng.choice(["text/plain", "application/x-www-form-urlencoded",
                                                     "application/vnd.api+json", "multipart/form-data", ""]))]
    elif shape < 0.13:
        content_type = []
    lengths = [("Content-Length", str(length))]
    if rng.random() < 0.04:
        lengths += lengths
    return content_type + lengths


def fuzz(url: str, names: list[str], paths: list[str], count: int, seed: int) -> Counter:
    """Sends `count` random requests; answers' statuses (500 and up included) counted by status."""
    rng = random.Random(seed)
    values = _values(names, paths)
    statuses: Counter = Counter()
    host = urlsplit(url).netloc
    for _ in range(count):
        connection = http.client.HTTPConnection(host, timeout=120)
        if rng.random() < 0.1:
            connection.request("GET", rng.choice(GETS))
        else:
            body = _body(rng, values)
            connection.putrequest("POST", rng.choice(ROUTES))
            for key, value in _headers(rng, len(body)):
                connection.putheader(key, value)
            connection.endheaders(body)
        response = connection.getresponse()
        response.read()
        statuses[response.status] += 1
        connection.close()
    return statuses
