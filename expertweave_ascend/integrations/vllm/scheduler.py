"""ExpertWeave's scheduler: vLLM's, with step policies that leave requests out of a step.

Two policies decide which requests a step may hold, in this order: variant grouping (grouping.py: the
requests of one non-expert variant per step) and contrastive pairing (pairing.py: a contrastive request and
its base-model twin sample in the same steps). Before each step every policy plans it and names the running
requests that sit it out and the waiting requests that may not start in it; the scheduler hides them all at
once and lets vLLM schedule the rest. Running requests that sit out keep their KV blocks, their seats and
their place in the running order (vLLM leaves running requests unscheduled whenever its token budget runs
out); waiting ones are taken out of the waiting queues for the step and put back in their places (as vLLM's
max_loras limit skips requests, which keep their places).

A step that schedules nothing has a cause, and every policy is told it, so that each acts on an empty step
only when the emptiness is its own doing (or nobody's): the policy that emptied it is the latest in the
order to say that what it alone left out could have run in the step (a later policy narrows the step the
earlier ones left: pairing's members ahead are its doing only when grouping let them and their partners
into the step, not when it gave the step to another variant or held the partners back); None when no
policy says so (vLLM found nothing it could run).

Passed to vLLM as its scheduler_cls by ExpertWeave's front-ends (engine.SCHEDULER), on vLLM 0.32 and 0.23
alike (the queues and the bound on running requests are the platform's SCHEDULER_WAITING and
SCHEDULER_SEATS); on the CPU vLLM schedules synchronously (no async scheduling), so the worker switches
weights for exactly the step scheduled.
"""

from collections import deque
from contextlib import contextmanager
from typing import Protocol

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from . import platforms
from .grouping import VariantGrouping
from .pairing import ContrastivePairing


class StepPolicy(Protocol):
    def plan(self, scheduler: Scheduler, waiting: list[Request]) -> tuple[list[Request], list[Request]]:
        """Decides the step about to be scheduled: the running requests that sit it out, and the waiting ones
        (of `waiting`, the scheduler's queues) that may not start in it."""

    def kept_step_empty(self, mine: set[int], others: set[int]) -> bool:
        """Whether the requests this policy left out of a step that scheduled nothing (mine, by id) could have
        run in it, as far as what the other policies left out (others) allowed."""

    def stepped(self, scheduler: Scheduler, scheduled: bool, emptied_by: "StepPolicy | None") -> None:
        """After the step: whether it scheduled any token and, when it did not, the policy that emptied it."""


class ExpertWeaveScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grouping = VariantGrouping()
        self.pairing = ContrastivePairing()
        self.policies: list[StepPolicy] = [self.grouping, self.pairing]

    def schedule(self, *args, **kwargs):
        sitting, held, left_out = self.plan_step()
        with sitting_out(self, sitting), held_back(self, held):
            output = super().schedule(*args, **kwargs)
        self.stepped(output.total_num_scheduled_tokens > 0, left_out)
        return output

    def plan_step(self) -> tuple[list[Request], list[Request], list[set[int]]]:
        """The running requests that sit the next step out, the waiting ones held back from it, and the ids of
        those each policy left out."""
        sitting, held, left_out = {}, {}, []
        waiting = [r for name in platforms.current().SCHEDULER_WAITING for r in getattr(self, name)]
        for policy in self.policies:
            sits, holds = policy.plan(self, waiting)
            sitting.update((id(r), r) for r in sits)
            held.update((id(r), r) for r in holds)
            left_out.append({id(r) for r in [*sits, *holds]})
        return list(sitting.values()), list(held.values()), left_out

    def stepped(self, scheduled: bool, left_out: list[set[int]]) -> None:
        emptied_by = None if scheduled else self.emptied_by(left_out)
        for policy in self.policies:
            policy.stepped(self, scheduled, emptied_by)

    def emptied_by(self, left_out: list[set[int]]) -> StepPolicy | None:
        """The policy that kept a step empty, given the ids of the requests each left out; None: nobody."""
        for i in reversed(range(len(self.policies))):
            others = set().union(*left_out[:i], *left_out[i + 1:])
            if self.policies[i].kept_step_empty(left_out[i], others):
                return self.policies[i]
        return None

    def add_request(self, request: Request) -> None:
        twin, unpairable = self.pairing.twin_for(self, request)
        super().add_request(request)
        if twin is not None:
            super().add_request(twin)
        if unpairable:
            self.pairing.fail(self, request.request_id, unpairable)

    def update_from_output(self, scheduler_output, model_runner_output):
        self.pairing.drop_unpaired_samples(self, scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        return self.pairing.settle(self, outputs)

    def finish_requests(self, request_ids, finished_status):
        return self.pairing.finish_requests(request_ids, finished_status, super().finish_requests)


@contextmanager
def sitting_out(scheduler: Scheduler, hidden: list[Request]):
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
def held_back(scheduler: Scheduler, held: list[Request]):
    """Takes these waiting requests out of the scheduler's waiting queues for the steps scheduled inside, and
    puts them back in their places."""
    if not held:
        yield
        return
    taken = {}
    ids = {id(r) for r in held}
    for name in platforms.current().SCHEDULER_WAITING:
        queue = getattr(scheduler, name)
        out = [r for r in queue if id(r) in ids]
        if out:
            taken[name] = (list(queue), out)
            queue.remove_requests(out)
    try:
        yield
    finally:
        for name, (order, out) in taken.items():
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
