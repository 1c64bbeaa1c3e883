"""Summary statistics of timings: percentiles (linear interpolation, as numpy's default)."""
from __future__ import annotations

import math


def percentile(values, p: float) -> float:
    """The p-th percentile (0..100) of `values`, interpolating between closest ranks."""
    xs = sorted(float(v) for v in values)
    if not xs:
        return math.nan
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {p}")
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def summarize(values) -> dict:
    """mean, median, p90, p99, min, max, std and count of a list of numbers."""
    xs = [float(v) for v in values]
    n = len(xs)
    if not n:
        return {"n": 0}
    mean = sum(xs) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "mean": mean, "median": percentile(xs, 50), "p90": percentile(xs, 90),
            "p99": percentile(xs, 99), "min": min(xs), "max": max(xs), "std": std}


def spread(values) -> float:
    """Relative spread: (max - min) / median (0 for fewer than two values)."""
    xs = [float(v) for v in values]
    med = percentile(xs, 50)
    return (max(xs) - min(xs)) / med if len(xs) > 1 and med else 0.0
