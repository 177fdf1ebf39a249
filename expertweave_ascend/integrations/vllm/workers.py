"""The front-end's one way to the engine's workers: every ExpertWeave call, with typed answers.

vLLM's collective_rpc runs a method of ExpertWeaveWorkerExtension (worker.py) on every worker and returns
each rank's answer in rank order. Answers cross the process boundary as plain data (vLLM serialises them
with msgpack), so each is a dataclass on both ends and a dict on the wire (`wire`, and `Answer(**wire)`
back). Only this module and worker.py name the methods.

Workers is asynchronous: the server awaits AsyncLLM's collective_rpc; offline, ExpertWeaveLLM runs the
front-end on an event loop of its own and gives Workers vllm.LLM's blocking collective_rpc.
"""

from dataclasses import asdict, dataclass
from typing import Awaitable, Callable

from ...loader import LoadAnswer
from ...reports import MemoryReport

Call = Callable[[str, tuple], Awaitable[list]]  # (worker method, its arguments) -> every rank's answer


def wire(answer) -> dict:
    return asdict(answer)


@dataclass(frozen=True)
class UnloadStatus:
    """A rank's answer to an unload: done, or the adapter's requests it still waits for."""
    unloaded: bool
    running: int = 0
    queued: int = 0


@dataclass(frozen=True)
class StartAnswer:
    """A rank's answer to starting a background load that first evicts an idle adapter (if one is named)."""
    started: bool = False
    evicted: bool = False  # the adapter named to evict is gone
    error: str | None = None
    running: int = 0  # when it could not evict: the victim's requests running and queued
    queued: int = 0


@dataclass(frozen=True)
class Collected:
    """A rank's finished background loads (published now), and the ones still running."""
    done: dict[str, LoadAnswer]
    loading: list[str]


@dataclass(frozen=True)
class ListedAdapter:
    path: str
    sha256: str
    experts: int
    bytes: int
    requests: int  # running on this rank now
    variant: bool


@dataclass(frozen=True)
class Tiers:
    """Where a rank holds adapters: on the device, loading, in the host tier; the tiers' bytes."""
    device: list[str]
    loading: list[str]
    host: list[str]
    host_bytes: int
    host_budget_bytes: int
    warm_bytes: int


class Workers:
    """Every call a front-end makes to the engine's workers. before_unload runs ahead of each call that may
    unload (offline, it hands an in-process engine's finished requests to the workers: lifetime.py)."""

    def __init__(self, call: Call, before_unload: Callable[[], None] = lambda: None):
        self._call = call
        self._before_unload = before_unload

    @classmethod
    def of_engine_client(cls, engine_client) -> "Workers":
        """For vLLM's AsyncLLM (the server)."""
        return cls(lambda method, args: engine_client.collective_rpc(method, args=args))

    @classmethod
    def of_llm(cls, llm) -> "Workers":
        """For a vllm.LLM (offline); its calls block the event loop that awaits them, which is the caller's."""
        from .lifetime import hand_over_finished_requests

        async def call(method: str, args: tuple) -> list:
            return llm.collective_rpc(method, args=args)
        return cls(call, lambda: hand_over_finished_requests(llm.llm_engine))

    async def load(self, name: str, path: str) -> list[LoadAnswer]:
        """Loads now, on every rank (each answers on its own; agreement.py decides)."""
        return [LoadAnswer(**a) for a in await self._call("expertweave_load_adapter", (name, path))]

    async def start_load(self, name: str, path: str, evict: str | None, live_request_ids: list[str]
                         ) -> list[StartAnswer]:
        if evict is not None:
            self._before_unload()
        started = await self._call("expertweave_start_load", (name, path, evict, live_request_ids))
        return [StartAnswer(**a) for a in started]

    async def collect(self) -> list[Collected]:
        return [Collected({name: LoadAnswer(**a) for name, a in c["done"].items()}, c["loading"])
                for c in await self._call("expertweave_collect_loads", ())]

    async def discard(self, name: str) -> None:
        await self._call("expertweave_discard_adapter", (name,))

    async def unload(self, name: str, live_request_ids: list[str]) -> list[UnloadStatus]:
        self._before_unload()
        statuses = await self._call("expertweave_unload_adapter", (name, live_request_ids))
        return [UnloadStatus(**a) for a in statuses]

    async def prefetch(self, name: str, path: str) -> None:
        await self._call("expertweave_prefetch", (name, path))

    async def warm_host_tier(self, entries: list[tuple[str, str]]) -> None:
        await self._call("expertweave_warm_host_tier", (entries,))

    async def adapters(self) -> dict[str, ListedAdapter]:
        """Rank 0's loaded adapters (the ranks hold the same ones: agreement.py)."""
        listed = (await self._call("expertweave_list_adapters", ()))[0]
        return {name: ListedAdapter(**a) for name, a in listed.items()}

    async def tiers(self) -> Tiers:
        return Tiers(**(await self._call("expertweave_tiers", ()))[0])

    async def memory_report(self) -> MemoryReport:
        return MemoryReport.from_json((await self._call("expertweave_memory_report", ()))[0])

    async def metrics(self) -> dict:
        """Rank 0's figures for /metrics (metrics.py reads them)."""
        return (await self._call("expertweave_metrics", ()))[0]

    async def close(self) -> None:
        await self._call("expertweave_close", ())
