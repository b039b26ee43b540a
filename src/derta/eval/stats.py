"""Confidence intervals for the rates derta reports: a 5-point gap between two rates on 60 prompts is noise."""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95 %


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate `successes / n` (sound at 0 %, 100 % and small n); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def with_interval(rate: float | None, n: int | None) -> str:
    """ "12.5 (8.1-18.7)": a rate in % with its 95 % Wilson interval, for report tables; "n/a" without a rate."""
    if rate is None or not n:
        return "n/a"
    lo, hi = wilson(rate * n, n)
    return f"{100 * rate:.1f} ({100 * lo:.0f}-{100 * hi:.0f})"
