"""Rank agreement (invariant I7): under tensor or data parallelism every rank loads an adapter on its
own, so a load counts only if every rank read the same bytes (the same content hash) into the same table
row and the same slots; else it is taken back on every rank that has it and the caller gets one error.

Each rank answers a load with its row and slots, or with the one-line error it met (loader.LoadAnswer);
the front-end (frontend.py) sends these answers here and, when told to, discards the adapter everywhere.
"""

from dataclasses import dataclass

from ...loader import LoadAnswer


@dataclass(frozen=True)
class LoadOutcome:
    loaded: LoadAnswer | None  # rank 0's answer, when every rank agrees
    error: str | None  # the one line the caller gets, when not
    roll_back: bool  # some rank holds the adapter and must discard it
    public_error: str | None = None  # error without anything read from the adapter's files (for HTTP)
    capacity: bool = False  # every rank that failed had no room for it


def check_load(name: str, answers: list[LoadAnswer]) -> LoadOutcome:
    failed = [(rank, a) for rank, a in enumerate(answers) if a.error is not None]
    loaded = [a for a in answers if a.error is None]
    if failed:
        rank, answer = failed[0]
        where = f" (rank {rank} of {len(answers)}; undone on the others)" if loaded else ""
        return LoadOutcome(None, f"{answer.error}{where}", bool(loaded), f"{answer.public_error or answer.error}{where}",
                           all(a.capacity for _, a in failed))
    if len({a.sha256 for a in loaded}) > 1:
        read = "; ".join(f"rank {rank}: sha256 {a.sha256[:12]}" for rank, a in enumerate(loaded))
        return LoadOutcome(None, f"adapter {name!r}: the ranks read different bytes ({read}); was it changed while "
                                 "loading? Undone on every rank", True)
    layouts = {(a.row, tuple(sorted((layer, tuple(s)) for layer, s in a.slots.items()))) for a in loaded}
    if len(layouts) > 1:
        placed = "; ".join(f"rank {rank}: row {a.row}" for rank, a in enumerate(loaded))
        return LoadOutcome(None, f"adapter {name!r}: the ranks placed it differently ({placed}); undone on every "
                                 "rank", True)
    return LoadOutcome(loaded[0], None, False)
