"""ExpertWeave's scheduler and its step policies, variant grouping and contrastive pairing, composed: in one
engine, contrastive requests for an adapter tuning experts only run beside an adapter tuning non-expert
modules, the variants switching while pairs are in flight, and every output equals its reference. An empty
step is put down to the policy that caused it: pairing preempts its members ahead only when the step held
them and their partners, not when grouping gave it to another variant or held the partners back."""

from collections import deque
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from catalogue_variants import merged_tokens  # noqa: E402
from test_variants import with_non_expert  # noqa: E402
from test_vllm_contrastive import OPTIONS, generate, scheduler  # noqa: E402
from test_vllm_contrastive import llm, references  # noqa: E402, F401  (the engine and the references)

TOKENS = 40  # several 16-step quanta: the variants take turns while the pairs run


def test_contrastive_requests_run_while_variants_switch(llm, references, tiny_decisive, tmp_path):
    from expertweave_ascend.integrations.vllm.variants import request_variant

    law_ne = with_non_expert(tiny_decisive, "law", tmp_path / "law-ne")
    llm.load_adapter("law-ne", law_ne)
    sched = scheduler(llm)
    steps, preempted = [], []
    schedule, preempt = sched.schedule, sched._preempt_request

    def watched(*args, **kwargs):
        pairs = len(sched.pairing.twins)
        output = schedule(*args, **kwargs)
        steps.append(({request_variant(sched.requests[rid].sampling_params) for rid in output.num_scheduled_tokens},
                      len(set(output.num_scheduled_tokens) & sched.pairing.twin_ids), pairs))
        return output

    sched.schedule = watched
    sched._preempt_request = lambda request, *args: (preempted.append(request.request_id), preempt(request, *args))
    prompts = [[5, 17, 42, 99], [3, 250, 7], [8, 8, 31], [40, 2], [5, 17, 42, 99], [3, 250, 7]]
    names = ["law", "law-ne", "law", None, "law-ne", "math"]
    options = [OPTIONS[0], None, OPTIONS[2], None, None, None]
    try:
        got = generate(llm, prompts, names, options, TOKENS)
    finally:
        del sched.schedule, sched._preempt_request
        llm.unload_adapter("law-ne")
    for prompt, name, option, tokens in zip(prompts, names, options, got):
        if name == "law-ne":
            assert tokens == merged_tokens(references.base, law_ne, prompt, TOKENS), name
        else:
            assert tokens == references.tokens(prompt, name, option, TOKENS), (name, option)
    assert all(len(variants) <= 1 for variants, _, _ in steps), "a step holds one variant"
    assert any(variants == {"law-ne"} and pairs for variants, _, pairs in steps), \
        "law-ne's steps ran while contrastive pairs were in flight"
    assert [twins for variants, twins, _ in steps if twins] and \
        all(variants == {None} for variants, twins, _ in steps if twins), "twins ran in the base variant's steps"
    turns = [variants for variants, _, _ in steps if variants]
    assert sum(a != b for a, b in zip(turns, turns[1:])) >= 3, "the variants took turns more than once"
    assert not preempted, "the KV cache holds everyone: grouping's turns preempted no pair"
    assert not sched.requests and not sched.pairing.twins


# -- the cause of an empty step, on the policies alone (no engine) -------------------------------------------

def request(rid: str, variant: str | None = None, running: bool = True, computed: int = 4, arrived: float = 1.0):
    from vllm.v1.request import RequestStatus

    from expertweave_ascend.integrations.vllm.variants import VARIANT_ARG

    return SimpleNamespace(request_id=rid, arrival_time=arrived, num_computed_tokens=computed,
                           status=RequestStatus.RUNNING if running else RequestStatus.WAITING,
                           sampling_params=SimpleNamespace(extra_args={VARIANT_ARG: variant} if variant else {}))


def policies_over(running, waiting, twins=None, variant=None, streak=0):
    """ExpertWeave's scheduler without vLLM's underneath: its policies over these requests; preempting puts a
    request first in the waiting queue, as vLLM does."""
    from expertweave_ascend.integrations.vllm import platforms
    from expertweave_ascend.integrations.vllm.grouping import VariantGrouping
    from expertweave_ascend.integrations.vllm.pairing import ContrastivePairing
    from expertweave_ascend.integrations.vllm.scheduler import ExpertWeaveScheduler

    sched = ExpertWeaveScheduler.__new__(ExpertWeaveScheduler)
    sched.grouping, sched.pairing = VariantGrouping(), ContrastivePairing()
    sched.policies = [sched.grouping, sched.pairing]
    sched.grouping.variant, sched.grouping.streak = variant, streak
    sched.pairing.twins = dict(twins or {})
    for name in platforms.current().SCHEDULER_WAITING:
        setattr(sched, name, deque())
    sched.running, sched.waiting = list(running), deque(waiting)
    sched.requests = {r.request_id: r for r in [*running, *waiting]}
    sched.preempted = []
    sched._preempt_request = lambda r, now: (sched.preempted.append(r.request_id), sched.waiting.appendleft(r))
    return sched


def empty_step(sched):
    """Plans a step, which then schedules nothing; returns who is left out of it and who emptied it."""
    sitting, held, left_out = sched.plan_step()
    emptied_by = sched.emptied_by(left_out)
    sched.stepped(False, left_out)
    return [r.request_id for r in sitting], [r.request_id for r in held], emptied_by


def test_an_empty_step_of_another_variant_is_groupings_and_preempts_no_pair():
    ahead, partner = request("c", computed=5), request("c~esft-base", computed=4)
    other = request("v", "law-ne", running=False, arrived=0.5)
    sched = policies_over([ahead, partner], [other], {"c": "c~esft-base"}, variant=None, streak=16)
    sitting, held, emptied_by = empty_step(sched)
    assert sched.grouping.chosen == "law-ne" and sitting == ["c", "c~esft-base"] and held == []
    assert emptied_by is sched.grouping
    assert sched.preempted == [] and sched.running == [ahead, partner], "the pair keeps its place and KV blocks"
    assert sched.grouping.starving and sched.grouping.starved == "law-ne", "law-ne is served next"


def test_an_empty_step_its_members_ahead_caused_is_pairings_and_preempts_them():
    ahead, partner = request("c", computed=5), request("c~esft-base", running=False, computed=0)
    other, plain = request("v", "law-ne", arrived=2.0), request("b", running=False, arrived=1.5)
    sched = policies_over([other, ahead], [plain, partner], {"c": "c~esft-base"}, variant=None, streak=3)
    sitting, held, emptied_by = empty_step(sched)
    assert sched.grouping.chosen is None and sitting == ["v", "c"] and held == []
    assert emptied_by is sched.pairing
    assert sched.preempted == ["c"] and sched.running == [other]
    assert [r.request_id for r in sched.waiting] == ["c", "c~esft-base", "b"], "the pair waits together"
    assert not sched.grouping.starving and sched.grouping.streak == 3, "the base keeps its turn"


def test_a_partner_held_back_for_a_starved_variant_is_groupings_doing():
    ahead, partner = request("c", computed=5), request("c~esft-base", running=False, computed=0)
    other = request("v", "law-ne", arrived=0.5)
    sched = policies_over([other, ahead], [partner], {"c": "c~esft-base"}, variant="law-ne", streak=16)
    sched.grouping.starved, sched.grouping.starving = "law-ne", True
    sitting, held, emptied_by = empty_step(sched)
    assert sched.grouping.chosen is None and sitting == ["v", "c"] and held == ["c~esft-base"]
    assert emptied_by is sched.grouping and sched.preempted == []


def test_without_variants_a_member_ahead_is_pairings_and_with_nothing_hidden_nobodys():
    ahead, partner = request("c", computed=5), request("c~esft-base", running=False, computed=0)
    sched = policies_over([ahead], [partner], {"c": "c~esft-base"})
    assert empty_step(sched) == (["c"], [], sched.pairing) and sched.preempted == ["c"]
    assert not sched.grouping.grouped, "only the base's requests: steps are not grouped"
    sched = policies_over([request("b")], [request("w", running=False)])
    assert empty_step(sched) == ([], [], None) and sched.preempted == []


def test_a_variant_that_finds_nothing_to_run_alone_passes_its_turn():
    sched = policies_over([request("v", "law-ne")], [], variant="law-ne", streak=2)
    assert empty_step(sched) == ([], [], None)
    assert sched.grouping.streak == 16 and not sched.grouping.starving, "nobody else waits: no one is starved"


@pytest.mark.parametrize("variant,streak,oldest,chosen", [
    (None, 0, {None: 1.0, "law-ne": 0.5}, None),  # the running group keeps the engine
    ("law-ne", 3, {"law-ne": 0.2}, "law-ne"),
    ("law-ne", 16, {"law-ne": 0.2}, "law-ne"),  # past its quantum, but nobody else waits
    ("law-ne", 16, {"law-ne": 0.2, None: 0.9, "ne-only": 0.4}, "ne-only"),  # past it: the oldest other group
    ("law-ne", 2, {None: 0.9, "ne-only": 0.4}, "ne-only"),  # its requests are gone
])
def test_grouping_serves_variants_first_come_first_served_within_a_quantum(variant, streak, oldest, chosen):
    from expertweave_ascend.integrations.vllm.grouping import VariantGrouping

    grouping = VariantGrouping()
    grouping.variant, grouping.streak = variant, streak
    assert grouping.choose(oldest) == chosen
