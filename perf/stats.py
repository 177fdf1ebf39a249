"""Ratios and differences with intervals: how the benchmarks turn paired measurements into claims.

Each benchmark measures its arms in alternation, so a pair of measurements (one per arm, taken together)
shares the machine's state at that moment. The ratio (or difference) of the arms' means gets a percentile
bootstrap interval over the pairs, resampled whole, so drift that hits both arms of a pair cancels. A
target on a ratio counts as met only when the interval's bound meets it.
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


def _interval(a, b, statistic, confidence: float, resamples: int, seed: int) -> Interval:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"needs two equal-length series of 2 or more paired measurements, got {a.shape} and {b.shape}")
    picks = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    resampled = statistic(a[picks].mean(axis=1), b[picks].mean(axis=1))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(resampled, [tail, 100 - tail])
    return Interval(float(statistic(a.mean(), b.mean())), float(low), float(high), len(a))


def ratio_interval(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """mean(a) / mean(b) of paired measurements and its bootstrap interval."""
    return _interval(a, b, np.divide, confidence, resamples, seed)


def difference_interval(a, b, confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """mean(a) - mean(b) of paired measurements and its bootstrap interval."""
    return _interval(a, b, np.subtract, confidence, resamples, seed)
