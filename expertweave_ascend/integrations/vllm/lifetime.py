"""Unloading an adapter once the engine says it is idle (invariant I2), for the server and the offline API.

The workers own request accounting: each counts the requests of every adapter from the scheduler's output
(a request begins when first scheduled and ends when the scheduler reports it finished, aborted ones
included, so a request whose client went away counts until its abort has landed). A request still queued
in the scheduler has not reached the workers yet: every request vLLM's engine client holds (its output
processor's request states, which a request leaves when it finishes or is aborted) must therefore have
reached the workers too. The front-ends stop admitting the adapter's requests first, then ask the workers
to unload it: a worker does so only when none of the adapter's requests run and none of the given live
requests is still queued, and otherwise says what it waits for.
"""

import asyncio
import time
from typing import Callable

from ...errors import AdapterBusyError, ExpertWeaveError

POLL_S = 0.05


def live_request_ids(engine) -> list[str]:
    """The requests vLLM's engine client (AsyncLLM or LLMEngine) has not seen finish."""
    return list(engine.output_processor.request_states)


async def unload_when_idle(workers, engine_client, name: str, timeout: float | None,
                           leased: Callable[[], int] = lambda: 0) -> None:
    """Unloads the adapter from every rank once it is idle, or raises AdapterBusyError after timeout seconds
    (None: no limit), changing nothing. leased(): the adapter's requests the front-end admitted and still
    holds (residency.py: from before the engine registers them until their responses end); they are waited
    for first, since one of them may not have reached the engine yet. engine_client: AsyncLLM or LLMEngine,
    whose live requests the workers must all have seen."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        leases = leased()
        statuses = [] if leases else await workers.unload(name, live_request_ids(engine_client))
        unloaded = {s.unloaded for s in statuses}
        if unloaded == {True}:
            return
        if True in unloaded:
            raise ExpertWeaveError(f"adapter {name!r}: the tensor-parallel ranks disagree on whether it is idle "
                                   f"({statuses}); the engine's ranks no longer hold the same adapters")
        if deadline is not None and time.monotonic() >= deadline:
            if leases:
                raise AdapterBusyError(f"adapter {name!r} still has {leases} request(s) running or on their way "
                                       f"into the engine after {timeout} s; not unloaded")
            raise AdapterBusyError(f"adapter {name!r} still has {max(s.running for s in statuses)} request(s) "
                                   f"running and {max(s.queued for s in statuses)} queued in the engine after "
                                   f"{timeout} s; not unloaded")
        await asyncio.sleep(POLL_S)


def hand_over_finished_requests(engine) -> None:
    """An in-process engine core (vllm.LLM with VLLM_ENABLE_V1_MULTIPROCESSING=0) steps only while
    generate runs, so the requests that finished in its last step never reach the workers; one more step
    hands them over, as vLLM's engine process does by itself once a step has finished requests."""
    from vllm.v1.engine.core_client import InprocClient

    if isinstance(engine.engine_core, InprocClient) and not engine.has_unfinished_requests():
        engine.step()


def worker_message(error: Exception) -> str:
    """The one-line message of an error raised in a worker, out of the text vLLM wraps it in."""
    text = str(error)
    for line in reversed(text.splitlines()):
        if ": " in line:
            return line.strip()
    return text
