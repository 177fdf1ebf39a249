"""Contrastive pairing: the step policy (scheduler.py) keeping contrastive requests and their twins in step.

A contrastive request (contrastive.py) gets a twin when it arrives: a request for the base model (table
row 0) on the same prompt, with the base's prefix-cache salt, hidden from every client. The twin is a
real request, so it counts toward the seats, the token budget and the KV blocks. The pair must sample in
the same steps, and vLLM schedules requests one by one, so pairing keeps them in step three ways:
  - a member that has computed more tokens than its partner (vLLM admitted or preempted one of them, or the
    token budget ran out between them) sits the steps out until its partner catches up; if a step then
    schedules nothing at all by pairing's doing (the step held a member ahead and its partner: grouping
    neither gave it to another variant nor held the partner back), the members ahead are preempted, giving
    back the KV blocks their partners wait for, and each waiting pair is put together in the queue, so that
    vLLM admits pairs whole;
  - after a step, a member that sampled while its partner did not (the token budget or the seats ran out
    between them) has its token dropped and its last position computed again next time, as vLLM rolls
    back rejected speculative tokens: the runner trims its copy from the scheduler's output count;
  - a twin ends with its request: finished, aborted or failed, and its outputs never leave the engine.
A request that cannot have a twin (prompt embeddings, multimodal inputs, a resumable streaming-input
session; the front-ends refuse these) or whose twin ended first fails (finish reason "error") rather than run unpaired.
"""

import time
from collections import deque

from vllm import SamplingParams
from vllm.logger import init_logger
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from . import platforms
from .contrastive import PAIR_ARG, request_contrastive
from .engine import SALT_MARKER

TWIN_SUFFIX = "~esft-base"  # a twin's request id: its request's id and this

logger = init_logger(__name__)


def twin_of(request: Request) -> Request:
    """The base-model twin of a contrastive request, marked as the pair's base member."""
    params = SamplingParams(max_tokens=request.max_tokens + 1, temperature=0.0, detokenize=False,
                            extra_args={PAIR_ARG: [request.request_id, "base"]})
    salt = (request.cache_salt or "").partition(SALT_MARKER)[0] or None
    return Request(request_id=request.request_id + TWIN_SUFFIX, prompt_token_ids=request.prompt_token_ids,
                   sampling_params=params, pooling_params=None, client_index=request.client_index,
                   arrival_time=request.arrival_time, cache_salt=salt, priority=request.priority,
                   block_hasher=request._block_hasher)


class ContrastivePairing:
    def __init__(self):
        self.twins: dict[str, str] = {}  # contrastive request id -> its twin's id
        self.dropped = 0  # tokens a member sampled without its partner, dropped to keep the pair in step
        self.failed: list[Request] = []  # contrastive requests that could not run paired, to report
        self.ahead: list[tuple[Request, Request]] = []  # (member, partner): the members sitting the step planned out

    # -- the step policy --------------------------------------------------------------------------------
    def plan(self, scheduler, waiting: list[Request]) -> tuple[list[Request], list[Request]]:
        self.ahead = [(member, partner) for pair in self._pairs(scheduler) for member, partner in (pair, pair[::-1])
                      if member.status == RequestStatus.RUNNING
                      and member.num_computed_tokens > partner.num_computed_tokens]
        return [member for member, _ in self.ahead], []  # waiting pairs are put together, never held

    def kept_step_empty(self, mine: set[int], others: set[int]) -> bool:
        """A member ahead kept its partner from running only where the step held both (grouping gave it to
        their variant and held neither back)."""
        return any(id(member) not in others and id(partner) not in others for member, partner in self.ahead)

    def stepped(self, scheduler, scheduled: bool, emptied_by) -> None:
        if scheduled or emptied_by is not self:
            return
        # Nothing could run: the partners need KV blocks the members ahead hold. Those go back to waiting.
        now = time.monotonic()
        for member, _ in self.ahead:
            scheduler.running.remove(member)
            scheduler._preempt_request(member, now)
        self._pair_up_waiting(scheduler)

    def _pair_up_waiting(self, scheduler) -> None:
        """Puts each waiting member right behind (or before) its waiting partner, so that vLLM admits pairs
        whole rather than one member of each (FCFS queues; a priority queue orders a pair together already,
        as its members share priority and arrival time)."""
        if not isinstance(scheduler.waiting, deque):
            return
        partner = {}
        for first, second in self._pairs(scheduler):
            partner[id(first)], partner[id(second)] = second, first
        waiting = {id(r) for r in scheduler.waiting}
        order, placed = [], set()
        for request in scheduler.waiting:
            if id(request) in placed:
                continue
            order.append(request)
            placed.add(id(request))
            other = partner.get(id(request))
            if other is not None and id(other) in waiting and id(other) not in placed:
                order.append(other)
                placed.add(id(other))
        scheduler.waiting.clear()
        scheduler.waiting.extend(order)

    # -- the pairs' lives ---------------------------------------------------------------------------------
    def twin_for(self, scheduler, request: Request) -> tuple[Request | None, str | None]:
        """For a request arriving: its twin (None: it is not a new contrastive request, or cannot have one)
        and why it cannot have one (None: it can, or needs none). The pair is known from here on."""
        if request_contrastive(request.sampling_params) is None or request.request_id in scheduler.requests:
            return None, None
        if request.prompt_token_ids is None or request.prompt_embeds is not None or request.mm_features \
                or request.resumable:
            return None, "a contrastive request needs a prompt of token ids alone, in one input"
        params = request.sampling_params.clone()
        params.extra_args = {**params.extra_args, PAIR_ARG: [request.request_id, "adapter"]}
        request.sampling_params = params
        twin = twin_of(request)
        self.twins[request.request_id] = twin.request_id
        return twin, None

    def drop_unpaired_samples(self, scheduler, scheduler_output, model_runner_output) -> None:
        """Before vLLM reads a step's samples: a member that sampled without its partner gives its token back."""
        sampled = model_runner_output.sampled_token_ids
        if not self.twins or not sampled:
            return
        index = model_runner_output.req_id_to_index
        scheduled = scheduler_output.num_scheduled_tokens

        def sampled_now(rid: str) -> bool:
            return rid in scheduled and rid in index and len(sampled[index[rid]]) > 0

        for rid, tid in self.twins.items():
            got = [r for r in (rid, tid) if sampled_now(r)]
            if len(got) != 1:
                continue
            (alone,) = got
            if sampled is model_runner_output.sampled_token_ids:
                sampled = model_runner_output.sampled_token_ids = list(sampled)
            sampled[index[alone]] = []
            request = scheduler.requests[alone]
            request.num_computed_tokens -= 1
            request.is_prefill_chunk = True
            self.dropped += 1

    def settle(self, scheduler, outputs: dict[int, EngineCoreOutputs]) -> dict[int, EngineCoreOutputs]:
        """After vLLM read a step's samples: pairs one of whose members ended end whole, twins' outputs are
        left out, and requests that failed are reported."""
        if self.twins:
            hidden = self.twin_ids  # before the pairs that end now take their twins' ids away
            ended = [rid for rid in self.twins if rid not in scheduler.requests
                     or scheduler.requests[rid].is_finished()]
            if ended:
                scheduler.finish_requests(ended, RequestStatus.FINISHED_ABORTED)
            for rid, tid in list(self.twins.items()):
                if tid not in scheduler.requests or scheduler.requests[tid].is_finished():
                    self.fail(scheduler, rid, "its base-model twin ended first")
            for engine_outputs in outputs.values():
                engine_outputs.outputs = [o for o in engine_outputs.outputs if o.request_id not in hidden]
        for request in self.failed:
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                events=request.take_events(), trace_headers=request.trace_headers))
        self.failed.clear()
        return outputs

    def fail(self, scheduler, request_id: str, why: str) -> None:
        request = scheduler.requests.get(request_id)
        if request is None or request.is_finished():
            return
        logger.warning("contrastive request %s failed: %s", request_id, why)
        scheduler.finish_requests(request_id, RequestStatus.FINISHED_ERROR)
        self.failed.append(request)

    def finish_requests(self, request_ids, finished_status, finish):
        """vLLM's finish_requests (`finish`), with a pair's twin finished with its request and left out of what
        is returned (vLLM 0.32 returns the requests finished, 0.23 their (id, client index): the platform's
        finished_request_id)."""
        if request_ids is None:
            ending = list(self.twins)
        else:
            request_ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            ending = [rid for rid in request_ids if rid in self.twins]
            request_ids |= {self.twins[rid] for rid in ending}
        twins = self.twin_ids
        finished = finish(request_ids, finished_status)
        for rid in ending:
            del self.twins[rid]
        finished_id = platforms.current().finished_request_id
        return [r for r in finished if finished_id(r) not in twins]

    @property
    def twin_ids(self) -> set[str]:
        return set(self.twins.values())

    def _pairs(self, scheduler) -> list[tuple[Request, Request]]:
        requests = scheduler.requests
        return [(requests[rid], requests[tid]) for rid, tid in self.twins.items()
                if rid in requests and tid in requests]
