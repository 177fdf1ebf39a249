"""`make soak`: a real `expertweave serve` under random mixed traffic for SOAK_S seconds (default 180).

Workers send random requests (the base, three adapters loaded by hand and three more served by name from
the adapter root, two rows for those three, so they are loaded and evicted all along; completions and
chat, streaming and not), abort streams half-way, load and unload a fourth adapter, send loads of a
damaged adapter, requests that try to smuggle adapter arguments past the front-end (headers read two
ways, vllm_xargs, a forged salt, beam search), and unloads racing the eviction of the same adapter;
every answer is checked: outputs equal the same request served alone before the soak (the tiny model
with decisive logits, whose greedy outputs do not depend on batching), bad loads and smuggling are 400,
a raced unload is 200, 404 or 409, nothing is 5xx. At the end every adapter is unloaded. One summary
line; exit 1 if any of these fails:
  any 5xx or wrong output; the server tree's RSS grows more than RSS_GROWTH (after a warm-up round);
  its open file descriptors grow by more than FD_SLACK; mapped bytes do not return to the base's.

    python -m perf.soak [--seconds S] [--workers N]
"""

import argparse
import http.client
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

from expertweave_ascend.tiny import make_tiny
from perf.servers import engine_args, get, post, start_expertweave, stop, wait_ready

MODELS = ("base", "law", "math", "code")  # the base, and the adapters loaded for the whole run
CATALOGUED = ("summary", "translation", "task6")  # served by name from the adapter root, two rows for three
PROMPTS = ("the court held that a contract requires", "solve for x when two plus three",
           "define a function that returns the sum", "translate the sentence into french")
TOKENS = 24

RSS_GROWTH = 0.05  # of the warmed-up RSS, plus RSS_SLACK
RSS_SLACK = 64 << 20
FD_SLACK = 4  # connections the server may still hold open while it closes them
CHURNED = "intent"


@dataclass
class Tally:
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    aborted: int = 0
    loads: int = 0
    unloads: int = 0
    bad_loads: int = 0
    smuggled: int = 0
    races: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def fail(self, what: str) -> None:
        with self.lock:
            self.failed.append(what)


def ask(url: str, model: str, prompt: str, chat: bool, stream: bool) -> tuple[int, set[str], str]:
    """One greedy request: (status, the model names the response gave, the generated text)."""
    body = {"model": model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True, "stream": stream}
    if chat:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    response = requests.post(url + path, json=body, stream=stream, timeout=300)
    if response.status_code != 200:
        return response.status_code, set(), response.text
    if not stream:
        answer = response.json()
        choice = answer["choices"][0]
        return 200, {answer["model"]}, choice["message"]["content"] if chat else choice["text"]
    names, text = set(), ""
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if "error" in chunk:  # refused after the stream began: vLLM reports it in the stream
                return chunk["error"].get("code") or 500, names, json.dumps(chunk["error"])
            names.add(chunk["model"])
            for choice in chunk["choices"]:
                text += (choice["delta"].get("content") or "") if chat else choice["text"]
    return 200, names, text


def usage(launcher: int) -> tuple[int, int]:
    """RSS bytes and open file descriptors, summed over `expertweave serve` and every process under it."""
    rss = fds = 0
    root = psutil.Process(launcher)
    for proc in [root, *root.children(recursive=True)]:
        try:
            rss += proc.memory_info().rss
            fds += proc.num_fds()
        except psutil.NoSuchProcess:
            continue
    return rss, fds


def smuggle(url: str, rng: random.Random) -> int:
    """One request trying to get adapter arguments past the front-end; its status (400 expected)."""
    forged = {"model": "base", "prompt": PROMPTS[0], "max_tokens": 4, "vllm_xargs": {"esft_adapter": "law"}}
    headers = [("Content-Type", "application/json")]
    form = rng.randrange(5)
    if form == 0:  # read two ways: the first Content-Type says JSON, the last text
        headers.append(("Content-Type", "text/plain"))
    elif form == 1:  # JSON under another name, with a pair argument only the scheduler sets
        forged["vllm_xargs"], headers = {"esft_pair": ["x"]}, [("Content-Type", "text/plain")]
    elif form == 2:  # the base under an adapter's salt
        forged = {**forged, "vllm_xargs": None, "cache_salt": "~esft:" + "0" * 32}
    elif form == 3:  # beam search, which runs outside the per-step routing
        forged = {"model": "law", "prompt": PROMPTS[0], "max_tokens": 4, "use_beam_search": True, "n": 2}
    body = json.dumps(forged).encode()
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=120)
    connection.putrequest("POST", "/v1/completions")
    for key, value in [*headers, ("Content-Length", str(len(body)))]:
        connection.putheader(key, value)
    connection.endheaders(body)
    status = connection.getresponse().status
    connection.close()
    return status


def race(url: str, reference: dict, rng: random.Random, tally: Tally) -> None:
    """An unload by hand of a catalogued adapter at the moment another one's request evicts it."""
    first, second = rng.sample(CATALOGUED, 2)
    ask(url, first, PROMPTS[0], False, False)
    barrier = threading.Barrier(2)

    def unload():
        barrier.wait()
        return requests.post(f"{url}/v1/unload_esft_adapter", json={"adapter_name": first}, timeout=300).status_code

    def evicting():
        barrier.wait()
        return ask(url, second, PROMPTS[1], False, False)

    with ThreadPoolExecutor(2) as pool:
        unloaded, served = pool.submit(unload), pool.submit(evicting)
        status, names, text = served.result()
        if unloaded.result() not in (200, 404, 409):
            tally.fail(f"unload of {first} racing an eviction: {unloaded.result()}")
        elif status != 200 or names != {second} or text != reference[second, PROMPTS[1], False, False]:
            tally.fail(f"{second} while {first} was unloaded: {status} {names} {text[:60]!r}")
        else:
            tally.add(races=1)


def worker(url: str, adapters: Path, bad: Path, reference: dict, deadline: float, tally: Tally, seed: int,
           churn_lock: threading.Lock, race_lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        roll = rng.random()
        if roll < 0.03:
            status = smuggle(url, rng)
            if status != 400:
                tally.fail(f"smuggled request answered {status}")
            tally.add(smuggled=1)
        elif roll < 0.05:
            with race_lock:  # one race at a time, so its two adapters are the ones in play
                race(url, reference, rng, tally)
        elif roll < 0.08:
            with churn_lock:  # one load/unload cycle of the churned adapter at a time
                retry_until = time.monotonic() + 60
                while True:  # 409 while every row holds a pinned adapter or one in use: retry, as a client would
                    loaded = requests.post(f"{url}/v1/load_esft_adapter", timeout=120,
                                           json={"adapter_name": CHURNED, "adapter_path": str(adapters / CHURNED)})
                    if loaded.status_code != 409 or time.monotonic() > retry_until:
                        break
                    time.sleep(0.2)
                unloaded = requests.post(f"{url}/v1/unload_esft_adapter", timeout=300,
                                         json={"adapter_name": CHURNED})
            if loaded.status_code != 200 or unloaded.status_code != 200:
                tally.fail(f"load/unload {CHURNED}: {loaded.status_code} {unloaded.status_code}")
            tally.add(loads=1, unloads=1)
        elif roll < 0.12:
            r = requests.post(f"{url}/v1/load_esft_adapter", timeout=60,
                              json={"adapter_name": "damaged", "adapter_path": str(bad)})
            if r.status_code != 400:
                tally.fail(f"damaged adapter load answered {r.status_code}")
            tally.add(bad_loads=1)
        elif roll < 0.2:
            model, prompt = rng.choice(MODELS), rng.choice(PROMPTS)
            with requests.post(f"{url}/v1/completions", stream=True, timeout=120, json={
                    "model": model, "prompt": prompt, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
                next(r.iter_lines(), None)  # one chunk, then the client goes away
            if r.status_code >= 500:
                tally.fail(f"aborted stream got {r.status_code}")
            tally.add(aborted=1)
        else:
            case = rng.choice(sorted(reference))
            status, names, text = ask(url, *case)
            for _ in range(100):  # a catalogued adapter unloaded by hand in a race: refused meanwhile, then reloaded
                if "is being unloaded" not in text or case[0] not in CATALOGUED:
                    break
                time.sleep(0.1)
                status, names, text = ask(url, *case)
            if status != 200 or names != {case[0]} or text != reference[case]:
                tally.fail(f"{case}: {status} {names} {text[:60]!r}")
            else:
                tally.add(ok=1)


def soak(seconds: float, workers: int) -> bool:
    work = Path(tempfile.mkdtemp(prefix="expertweave-soak-"))
    logs = Path(tempfile.mkdtemp(prefix="expertweave-soak-logs-"))  # kept: the server's log
    try:
        make_tiny(work / "tiny", adapters=4 + len(CATALOGUED), seed=0, decisive=True)
        adapters = work / "tiny" / "adapters"
        bad = adapters / "damaged"
        shutil.copytree(adapters / "law", bad)
        (bad / "model.safetensors").write_bytes((bad / "model.safetensors").read_bytes()[:-64])
        server = start_expertweave("soak", work / "tiny" / "base", 6, [*engine_args(64 << 20, eager=True),
                                                                     "--dtype", "float32"], logs,
                                   serve_args=("--adapter-slots", "48", "--adapter-root", str(adapters)))
        try:
            wait_ready([server])
            url = server.url
            for name in MODELS[1:]:
                post(server, "/v1/load_esft_adapter", {"adapter_name": name, "adapter_path": str(adapters / name)})
            cases = [(m, p, chat, stream) for m in (*MODELS, *CATALOGUED) for p in PROMPTS for chat in (False, True)
                     for stream in (False, True)]
            reference = {case: ask(url, *case)[2] for case in cases}  # alone, one at a time
            tally = Tally()
            churn_lock, race_lock = threading.Lock(), threading.Lock()
            warm_up = time.monotonic() + min(30.0, seconds / 4)
            threads = [threading.Thread(target=worker, args=(url, adapters, bad, reference, warm_up, tally, 100 + i,
                                                             churn_lock, race_lock)) for i in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            rss_start, fds_start = usage(server.proc.pid)
            deadline = time.monotonic() + seconds
            threads = [threading.Thread(target=worker, args=(url, adapters, bad, reference, deadline, tally, i,
                                                             churn_lock, race_lock)) for i in range(workers)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for name in get(server, "/v1/esft_adapters")["adapters"]:
                r = requests.post(f"{url}/v1/unload_esft_adapter", json={"adapter_name": name}, timeout=300)
                if r.status_code != 200:
                    tally.fail(f"final unload of {name}: {r.status_code}")
            time.sleep(2)  # let the server close the connections it was handed back
            rss_end, fds_end = usage(server.proc.pid)
            memory = get(server, "/v1/esft_adapters")["memory"]
        finally:
            stop([server])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mapped = memory["base_mapped_bytes"] + memory["adapter_mapped_bytes"]
    rss_ok = rss_end <= rss_start * (1 + RSS_GROWTH) + RSS_SLACK
    fds_ok = fds_end <= fds_start + FD_SLACK
    mapped_ok = memory["adapter_mapped_bytes"] == 0
    passed = not tally.failed and rss_ok and fds_ok and mapped_ok
    print(f"soak {seconds:g} s, {workers} workers: requests {tally.ok} ok / {len(tally.failed)} failed, "
          f"{tally.aborted} streams aborted, loads {tally.loads} / unloads {tally.unloads}, "
          f"{tally.bad_loads} bad loads refused, {tally.smuggled} smuggling attempts refused, {tally.races} unloads "
          f"raced an eviction; server RSS {rss_start / 2**30:.2f} -> {rss_end / 2**30:.2f} GiB "
          f"({'ok' if rss_ok else 'GREW'}), open fds {fds_start} -> {fds_end} ({'ok' if fds_ok else 'GREW'}), "
          f"mapped {mapped / 2**20:.2f} MiB vs base {memory['base_mapped_bytes'] / 2**20:.2f} MiB "
          f"({'ok' if mapped_ok else 'NOT BACK'}): {'PASS' if passed else 'FAIL'}")
    for failure in tally.failed[:10]:
        print(f"  failed: {failure}", file=sys.stderr)
    if not passed:
        print(f"  server log: {server.log}", file=sys.stderr)
    return passed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=float(os.environ.get("SOAK_S", 180)))
    parser.add_argument("--workers", type=int, default=6)
    args = parser.parse_args()
    sys.exit(0 if soak(args.seconds, args.workers) else 1)


if __name__ == "__main__":
    main()
