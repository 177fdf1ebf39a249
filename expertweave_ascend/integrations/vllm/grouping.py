"""Variant grouping: the step policy (scheduler.py) giving each step the requests of one non-expert variant
(variants.py).

A variant is an adapter that tunes non-expert modules; every other request (the base, adapters that tune
experts only) belongs to the base's variant, None. The variant running keeps the engine while it has
requests, for at most QUANTUM consecutive steps while another variant has requests; then the variant with
the oldest request runs. Requests of other variants sit the step out (running ones) or are held back
(waiting ones). A variant whose turn yields no step through grouping's own doing or nobody's (the others'
running requests hold the seats or the KV blocks it needs) is starved: the others run on but admit no new
request until it has had a step. A step another policy emptied (pairing, which preempts) does not count: the
variant chosen keeps its turn. While every request is the base's, the base ran last and no variant is
starved, steps are not grouped at all.
"""

from vllm.v1.request import Request

from .variants import request_variant

QUANTUM = 16


class VariantGrouping:
    def __init__(self):
        self.variant: str | None = None  # the variant the last step ran
        self.streak = 0  # consecutive steps it ran
        self.grouped = False  # whether the step planned is grouped
        self.chosen: str | None = None  # the variant of the step planned
        self.variants = 0  # how many variants have requests in it
        self.starved: str | None = None  # a variant whose turn yielded no step, None: none
        self.starving = False  # whether one is (None is a variant too)

    def plan(self, scheduler, waiting: list[Request]) -> tuple[list[Request], list[Request]]:
        queued = [*scheduler.running, *waiting]
        if not queued:
            self.variant, self.streak = None, 0
        oldest: dict[str | None, float] = {}
        for request in queued:
            variant = request_variant(request.sampling_params)
            oldest[variant] = min(oldest.get(variant, request.arrival_time), request.arrival_time)
        if self.starving and self.starved not in oldest:
            self.starving = False  # its requests finished or were aborted
        self.grouped = not (set(oldest) <= {None} and self.variant is None and not self.starving)
        if not self.grouped:
            return [], []
        self.chosen, self.variants = self.choose(oldest), len(oldest)
        return ([r for r in scheduler.running if request_variant(r.sampling_params) != self.chosen],
                [r for r in waiting if not self.admits(r)])

    def choose(self, oldest: dict[str | None, float]) -> str | None:
        """The variant of the next step, given the arrival time of each variant's oldest request."""
        others = {v: t for v, t in oldest.items() if v != self.variant}
        if self.variant in oldest and (self.streak < QUANTUM or not others):
            return self.variant
        if not others:
            return None
        return min(others, key=others.get)

    def admits(self, request: Request) -> bool:
        """Whether a waiting request may start in the grouped step planned."""
        variant = request_variant(request.sampling_params)
        return variant == self.chosen and (not self.starving or variant == self.starved)

    def kept_step_empty(self, mine: set[int], others: set[int]) -> bool:
        return bool(mine)  # what it left out holds the seats or KV blocks the step's variant needs, or could run

    def stepped(self, scheduler, scheduled: bool, emptied_by) -> None:
        if not self.grouped:
            return
        if scheduled:
            self.streak = self.streak + 1 if self.chosen == self.variant else 1
            if self.starving and self.chosen == self.starved:
                self.starving = False
        elif emptied_by in (self, None):  # nothing of this variant could run: the next step goes to another
            self.streak = QUANTUM
            if self.variants > 1 and not self.starving:
                self.starved, self.starving = self.chosen, True
        elif self.chosen != self.variant:  # another policy emptied the step and sees to it: the turn stays
            self.streak = 0
        self.variant = self.chosen
