"""Confidence intervals for the rates derta reports: a 5-point gap between two rates on 60 prompts is noise.

wilson(k, n)            the 95 % Wilson score interval of a rate k / n (every share of prompts)
ci95(rate, n)           the same as [low, high] for summary.json, from a rate and its n
bootstrap_mean(values)  a 95 % percentile-bootstrap interval of a mean (averaged rates, scores, win rates)
with_interval, with_ci  "12.5 (8-19)" for report tables
"""

from __future__ import annotations

import math
import random

Z95 = 1.959964  # two-sided 95 %
BOOTSTRAP_SAMPLES = 1000  # resamples of the prompts; seeded, so a summary is the same on every run


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a rate `successes / n` (sound at 0 %, 100 % and small n); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def ci95(rate: float | None, n: int | None) -> list[float] | None:
    """[low, high] of a rate's 95 % Wilson interval, rounded like the rates in summary.json; None without a rate."""
    if rate is None or not n:
        return None
    return [round(x, 4) for x in wilson(rate * n, n)]


def bootstrap_mean(values: list[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> list[float] | None:
    """[low, high]: the 2.5th and 97.5th percentiles of the mean over `samples` resamples (with replacement).

    For averages of per-prompt values that are not one yes/no rate: the mean ASR over attacks (each prompt's value
    is its mean over the attacks), the depth curve's area, StrongREJECT scores, win rates with ties.
    """
    if not values:
        return None
    rng, n = random.Random(seed), len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    low, high = means[int(0.025 * samples)], means[min(samples - 1, math.ceil(0.975 * samples) - 1)]
    return [round(low, 4), round(high, 4)]


def with_interval(rate: float | None, n: int | None) -> str:
    """ "12.5 (8-19)": a rate in % with its 95 % Wilson interval, for report tables; "n/a" without a rate."""
    return with_ci(rate, ci95(rate, n)) if rate is not None and n else "n/a"


def with_ci(value: float | None, interval: list[float] | None) -> str:
    """ "12.5 (8-19)": a rate in % with a given 95 % interval (bootstrap ones too); "n/a" without a value."""
    if value is None:
        return "n/a"
    if interval is None:
        return f"{100 * value:.1f}"
    return f"{100 * value:.1f} ({100 * interval[0]:.0f}-{100 * interval[1]:.0f})"
