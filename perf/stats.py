"""Ratios and differences with intervals: how the benchmarks turn paired measurements into claims.

Each benchmark measures its arms in alternation, so a pair of measurements (one per arm, taken together)
shares the machine's state at that moment. The ratio (or difference) of the arms' means gets a percentile
bootstrap interval over the pairs, resampled whole, so drift that hits both arms of a pair cancels. A
target on a ratio counts as met only when the interval's bound meets it.

Where a few pairs land far off (a run the machine slowed by a third), the mean moves with them; the
median of the pairs' own ratios does not, so median_ratio_interval gives the typical ratio with an interval
that such tails do not widen.

Pairs taken on different engine instances (each instance built afresh: its memory placed anew) can differ
by more than pairs of one instance do. Given each pair's instance, the bootstrap resamples instances, then
pairs within them, so the interval also holds that spread.
"""

from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class Interval:
    value: float  # the statistic on all pairs: mean(a) / mean(b), or mean(a) - mean(b)
    low: float
    high: float
    pairs: int

    @property
    def half_width(self) -> float:
        """Half the interval's width, relative to the value (0.02: +-2%)."""
        return (self.high - self.low) / 2 / abs(self.value)

    def to_json(self) -> dict:
        return {**asdict(self), "half_width": self.half_width}


def _picks(n: int, groups, resamples: int, rng) -> np.ndarray:
    """[resamples, n] indices of the pairs in each resample."""
    if groups is None:
        return rng.integers(0, n, size=(resamples, n))
    labels = np.asarray(groups)
    if labels.shape != (n,):
        raise ValueError(f"needs one group per pair, got {labels.shape[0] if labels.ndim else 0} for {n} pairs")
    members = [np.flatnonzero(labels == g) for g in np.unique(labels)]
    if len(members) < 2 or len({len(m) for m in members}) != 1:
        raise ValueError(f"needs 2 or more groups of equal size, got sizes {[len(m) for m in members]}")
    members = np.stack(members)
    count, size = members.shape
    chosen = rng.integers(0, count, size=(resamples, count, 1))
    within = rng.integers(0, size, size=(resamples, count, size))
    return members[chosen, within].reshape(resamples, n)


def _interval(a, b, statistic, confidence: float, resamples: int, seed: int, groups) -> Interval:
    """statistic(a, b) reduces the last axis: on all pairs, and on each resample of them."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"needs two equal-length series of 2 or more paired measurements, got {a.shape} and {b.shape}")
    picks = _picks(len(a), groups, resamples, np.random.default_rng(seed))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistic(a[picks], b[picks]), [tail, 100 - tail])
    return Interval(float(statistic(a, b)), float(low), float(high), len(a))


def ratio_interval(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0,
                   groups=None) -> Interval:
    """mean(a) / mean(b) of paired measurements and its bootstrap interval; groups: each pair's instance."""
    return _interval(a, b, lambda a, b: a.mean(-1) / b.mean(-1), confidence, resamples, seed, groups)


def difference_interval(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0,
                        groups=None) -> Interval:
    """mean(a) - mean(b) of paired measurements and its bootstrap interval; groups: each pair's instance."""
    return _interval(a, b, lambda a, b: a.mean(-1) - b.mean(-1), confidence, resamples, seed, groups)


def median_ratio_interval(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0,
                          groups=None) -> Interval:
    """The median of the pairs' ratios a[i] / b[i] and its bootstrap interval; groups: each pair's instance."""
    return _interval(a, b, lambda a, b: np.median(a / b, axis=-1), confidence, resamples, seed, groups)
