"""vLLM's scheduler, giving each step the requests of one non-expert variant (variants.py).

A variant is an adapter that tunes non-expert modules; every other request (the base, adapters that tune
experts only) belongs to the base's variant, None. The variant running keeps the engine while it has
requests, for at most QUANTUM consecutive steps while another variant has requests; then the variant with
the oldest request runs. Requests of other variants stay where they are: running ones keep their KV
blocks and are left out of the step (vLLM leaves running requests unscheduled whenever its token budget
runs out), waiting ones are held out of the waiting queues for the step and put back in their places (as
vLLM's max_loras limit skips requests, which keep their places). A variant whose turn yields no step (the others' running requests hold the seats or the KV
blocks it needs) is starved: the others run on but admit no new request until it has had a step.

Passed to vLLM as its scheduler_cls by ExpertWeave's front-ends, on vLLM 0.32 and 0.23 alike (the queues
and the bound on running requests are the platform's SCHEDULER_WAITING and SCHEDULER_SEATS); on the CPU
vLLM schedules synchronously (no async scheduling), so the worker switches weights for exactly the step
scheduled.
"""

from collections import deque
from contextlib import contextmanager
from typing import Callable

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from . import platforms
from .variants import request_variant

QUANTUM = 16


@contextmanager
def sitting_out(scheduler: Scheduler, hidden: list):
    """Leaves these running requests out of the steps scheduled inside: they keep their KV blocks, their
    seats and their place in the running order."""
    if not hidden:
        yield
        return
    seats = platforms.current().SCHEDULER_SEATS
    original = list(scheduler.running)
    left_out = {id(r) for r in hidden}
    scheduler.running[:] = [r for r in original if id(r) not in left_out]
    setattr(scheduler, seats, getattr(scheduler, seats) - len(hidden))
    try:
        yield
    finally:
        setattr(scheduler, seats, getattr(scheduler, seats) + len(hidden))
        kept = left_out | {id(r) for r in scheduler.running}
        before = {id(r) for r in original}
        scheduler.running[:] = [r for r in original if id(r) in kept] + [r for r in scheduler.running
                                                                          if id(r) not in before]


@contextmanager
def held_back(scheduler: Scheduler, admissible: Callable[[Request], bool]):
    """Takes the waiting requests that are not admissible out of the scheduler's waiting queues for the steps
    scheduled inside, and puts them back in their places."""
    held = {}
    for name in platforms.current().SCHEDULER_WAITING:
        queue = getattr(scheduler, name)
        out = [r for r in queue if not admissible(r)]
        if out:
            held[name] = (list(queue), out)
            queue.remove_requests(out)
    try:
        yield
    finally:
        for name, (order, out) in held.items():
            _put_back(getattr(scheduler, name), order, out)


def _put_back(queue, order: list[Request], out: list[Request]) -> None:
    """Returns the held requests to a queue that held `order` before: in that order (FCFS) behind the requests
    the step put in front (vLLM prepends those it preempts), or by priority."""
    if not isinstance(queue, deque):
        for request in out:
            queue.add_request(request)
        return
    now = list(queue)
    before, kept = {id(r) for r in order}, {id(r) for r in now} | {id(r) for r in out}
    queue.clear()
    queue.extend([r for r in now if id(r) not in before] + [r for r in order if id(r) in kept])


def queued_requests(scheduler: Scheduler) -> list[Request]:
    """Every request the scheduler holds, running or waiting."""
    waiting = [r for name in platforms.current().SCHEDULER_WAITING for r in getattr(scheduler, name)]
    return [*scheduler.running, *waiting]


class VariantScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.variant: str | None = None  # the variant the last step ran
        self.streak = 0  # consecutive steps it ran
        self._step_variant: str | None = None
        self._starved: str | None = None  # a variant whose turn yielded no step, None: none
        self._starving = False  # whether one is (None is a variant too)

    def schedule(self, *args, **kwargs):
        queued = queued_requests(self)
        if not queued:
            self.variant, self.streak = None, 0
        oldest: dict[str | None, float] = {}
        for request in queued:
            variant = request_variant(request.sampling_params)
            oldest[variant] = min(oldest.get(variant, request.arrival_time), request.arrival_time)
        if self._starving and self._starved not in oldest:
            self._starving = False  # its requests finished or were aborted
        if set(oldest) <= {None} and self.variant is None and not self._starving:
            self._step_variant = None
            return super().schedule(*args, **kwargs)
        chosen = self._choose(oldest)
        self._step_variant = chosen
        with sitting_out(self, [r for r in self.running if request_variant(r.sampling_params) != chosen]), \
                held_back(self, self._admissible):
            output = super().schedule(*args, **kwargs)
        if output.total_num_scheduled_tokens:
            self.streak = self.streak + 1 if chosen == self.variant else 1
            if self._starving and chosen == self._starved:
                self._starving = False
        else:  # nothing of this variant could run: the next step goes to another, which admits no one new
            self.streak = QUANTUM
            if len(oldest) > 1 and not self._starving:
                self._starved, self._starving = chosen, True
        self.variant = chosen
        return output

    def _choose(self, oldest: dict[str | None, float]) -> str | None:
        others = {v: t for v, t in oldest.items() if v != self.variant}
        if self.variant in oldest and (self.streak < QUANTUM or not others):
            return self.variant
        if not others:
            return None
        return min(others, key=others.get)

    def _admissible(self, request: Request) -> bool:
        """Whether a waiting request may start in the step being scheduled."""
        variant = request_variant(request.sampling_params)
        return variant == self._step_variant and (not self._starving or variant == self._starved)
