"""ExpertWeave's scheduler: variant grouping (grouping.py) and the twins of contrastive requests.

A contrastive request (contrastive.py) gets a twin when it arrives: a request for the base model (table
row 0) on the same prompt, with the base's prefix-cache salt, hidden from every client. The twin is a
real request, so it counts toward the seats, the token budget and the KV blocks. The pair must sample in
the same steps, and vLLM schedules requests one by one, so the scheduler keeps them in step three ways:
  - a member that has computed more tokens than its partner (vLLM admitted or preempted one of them, or the
    token budget ran out between them) sits the steps out until its partner catches up; if a step then
    schedules nothing at all, the members ahead are preempted, giving back the KV blocks their partners
    wait for, and each waiting pair is put together in the queue, so that vLLM admits pairs whole;
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
from .grouping import VariantScheduler, sitting_out

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


class PairedScheduler(VariantScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.twins: dict[str, str] = {}  # contrastive request id -> its twin's id
        self.dropped = 0  # tokens a member sampled without its partner, dropped to keep the pair in step
        self.failed: list[Request] = []  # contrastive requests that could not run paired, to report

    def add_request(self, request: Request) -> None:
        if request_contrastive(request.sampling_params) is None or request.request_id in self.requests:
            return super().add_request(request)
        if request.prompt_token_ids is None or request.prompt_embeds is not None or request.mm_features \
                or request.resumable:
            super().add_request(request)
            return self._fail(request.request_id, "a contrastive request needs a prompt of token ids alone, in one "
                                                  "input")
        params = request.sampling_params.clone()
        params.extra_args = {**params.extra_args, PAIR_ARG: [request.request_id, "adapter"]}
        request.sampling_params = params
        twin = twin_of(request)
        super().add_request(request)
        super().add_request(twin)
        self.twins[request.request_id] = twin.request_id

    def schedule(self, *args, **kwargs):
        if not self.twins:
            return super().schedule(*args, **kwargs)
        ahead = [member for members in self._pairs() for member, partner in (members, members[::-1])
                 if member.status == RequestStatus.RUNNING and member.num_computed_tokens > partner.num_computed_tokens]
        with sitting_out(self, ahead):
            output = super().schedule(*args, **kwargs)
        if ahead and not output.total_num_scheduled_tokens:
            # Nothing could run: the partners need KV blocks the members ahead hold. Those go back to waiting.
            now = time.monotonic()
            for member in ahead:
                self.running.remove(member)
                self._preempt_request(member, now)
            self._pair_up_waiting()
        return output

    def _pair_up_waiting(self) -> None:
        """Puts each waiting member right behind (or before) its waiting partner, so that vLLM admits pairs
        whole rather than one member of each (FCFS queues; a priority queue orders a pair together already,
        as its members share priority and arrival time)."""
        if not isinstance(self.waiting, deque):
            return
        partner = {}
        for rid, tid in self.twins.items():
            if rid in self.requests and tid in self.requests:
                partner[id(self.requests[rid])], partner[id(self.requests[tid])] = self.requests[tid], self.requests[rid]
        waiting = {id(r) for r in self.waiting}
        order, placed = [], set()
        for request in self.waiting:
            if id(request) in placed:
                continue
            order.append(request)
            placed.add(id(request))
            other = partner.get(id(request))
            if other is not None and id(other) in waiting and id(other) not in placed:
                order.append(other)
                placed.add(id(other))
        self.waiting.clear()
        self.waiting.extend(order)

    def update_from_output(self, scheduler_output, model_runner_output):
        if self.twins:
            self._drop_unpaired_samples(scheduler_output, model_runner_output)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.twins:
            hidden = self.twin_ids  # before the pairs that end now take their twins' ids away
            ended = [rid for rid in self.twins if rid not in self.requests or self.requests[rid].is_finished()]
            if ended:
                self.finish_requests(ended, RequestStatus.FINISHED_ABORTED)
            for rid, tid in list(self.twins.items()):
                if tid not in self.requests or self.requests[tid].is_finished():
                    self._fail(rid, "its base-model twin ended first")
            for engine_outputs in outputs.values():
                engine_outputs.outputs = [o for o in engine_outputs.outputs if o.request_id not in hidden]
        for request in self.failed:
            outputs.setdefault(request.client_index, EngineCoreOutputs()).outputs.append(EngineCoreOutput(
                request_id=request.request_id, new_token_ids=[], finish_reason=request.get_finished_reason(),
                events=request.take_events(), trace_headers=request.trace_headers))
        self.failed.clear()
        return outputs

    def _fail(self, request_id: str, why: str) -> None:
        request = self.requests.get(request_id)
        if request is None or request.is_finished():
            return
        logger.warning("contrastive request %s failed: %s", request_id, why)
        self.finish_requests(request_id, RequestStatus.FINISHED_ERROR)
        self.failed.append(request)

    def finish_requests(self, request_ids, finished_status):
        """vLLM's, with a pair's twin finished with its request and left out of what is returned (vLLM 0.32
        returns the requests finished, 0.23 their (id, client index): the platform's finished_request_id)."""
        if request_ids is None:
            ending = list(self.twins)
        else:
            request_ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
            ending = [rid for rid in request_ids if rid in self.twins]
            request_ids |= {self.twins[rid] for rid in ending}
        twins = self.twin_ids
        finished = super().finish_requests(request_ids, finished_status)
        for rid in ending:
            del self.twins[rid]
        finished_id = platforms.current().finished_request_id
        return [r for r in finished if finished_id(r) not in twins]

    @property
    def twin_ids(self) -> set[str]:
        return set(self.twins.values())

    def _pairs(self) -> list[tuple[Request, Request]]:
        return [(self.requests[rid], self.requests[tid]) for rid, tid in self.twins.items()
                if rid in self.requests and tid in self.requests]

    def _drop_unpaired_samples(self, scheduler_output, model_runner_output) -> None:
        sampled = model_runner_output.sampled_token_ids
        if not sampled:
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
            request = self.requests[alone]
            request.num_computed_tokens -= 1
            request.is_prefill_chunk = True
            self.dropped += 1
