"""The prefill depth curve: attack success against how many tokens of a harmful response were prefilled.

Qi et al. (2024) find ASR rising with the number of prefilled harmful tokens (5 to 40), and a defence that holds at a
shallow cut may fail at a deep one. `derta eval --attacks prefill-depth` runs prefill-tokens at
`eval.attacks.PREFILL_DEPTHS`; the summary reads every run's prefill-tokens:N attacks (two depths or more) as one curve:

    depth_curve(rows)        ASR per depth with 95 % Wilson intervals, and the area under the curve
    depth_auc(depths, asr)   that area in one number: depth on a log axis, normalised to [0, 1]
    plot_depth(curves, png)  ASR against depth (log axis), one line per model

The area is the mean ASR over log-depth (trapezoids): 0 when no depth ever breaks the model, 1 when every depth
always does. It depends on the depths measured, so compare areas over the same depths (prefill-depth's, by default).
"""

from __future__ import annotations

import math
import os

from derta.eval.attacks import PREFIX_FAMILIES
from derta.eval.stats import bootstrap_mean, ci95
from derta.io import pyplot, write_png

FAMILY = PREFIX_FAMILIES[0]  # prefill-tokens:N


def depth_weights(depths: list[int]) -> list[float]:
    """Each depth's trapezoid weight on log(depth), summing to 1, so that the area is sum(weight x ASR)."""
    if len(depths) == 1:
        return [1.0]
    logs = [math.log(d) for d in depths]
    span = logs[-1] - logs[0]
    weights = [0.0] * len(depths)
    for k in range(len(depths) - 1):
        half = (logs[k + 1] - logs[k]) / (2 * span)
        weights[k] += half
        weights[k + 1] += half
    return weights


def depth_auc(depths: list[int], rates: list[float]) -> float:
    """The area under ASR against log(depth) divided by the log-depth range, in [0, 1] (depths ascending, > 0);
    with one depth, its ASR. The one number the depth curve is summed up in, by `derta eval` and the demo alike."""
    if not depths or len(depths) != len(rates) or any(b <= a for a, b in zip(depths, depths[1:])) or depths[0] <= 0:
        raise ValueError("depth_auc needs ascending positive depths, one rate each")
    return round(sum(w * r for w, r in zip(depth_weights(depths), rates)), 4)


def depth_of(attack: str) -> int | None:
    """N of a prefill-tokens:N attack name, else None."""
    family, _, n = attack.partition(":")
    return int(n) if family == FAMILY and n.isdigit() else None


def depth_curve(rows: list[dict]) -> dict | None:
    """The curve of a run's prefill-tokens:N rows (one per attack and prompt: `attack`, `index`, `harmful`), None
    with fewer than two depths. `whole_response` counts the prompts whose harmful response was shorter than the
    depth (prefilled whole); the area's interval is a bootstrap over the prompts every depth has."""
    by_depth: dict[int, dict] = {}
    for r in rows:
        d = depth_of(str(r.get("attack")))
        if d is not None:
            by_depth.setdefault(d, {})[r.get("index")] = r
    depths = sorted(by_depth)
    if len(depths) < 2:
        return None
    asr, n = [], []
    for d in depths:
        flags = [bool(r.get("harmful")) for r in by_depth[d].values()]
        n.append(len(flags))
        asr.append(round(sum(flags) / len(flags), 4))
    weights = depth_weights(depths)
    common = set.intersection(*(set(by_depth[d]) for d in depths))
    per_prompt = [sum(w * bool(by_depth[d][i].get("harmful")) for w, d in zip(weights, depths)) for i in sorted(common)]
    return {
        "attacks": [f"{FAMILY}:{d}" for d in depths],
        "depths": depths,
        "asr": asr,
        "n": n,
        "ci95": [ci95(a, k) for a, k in zip(asr, n)],
        "whole_response": [
            sum(bool((r.get("attack_details") or {}).get("whole_response")) for r in by_depth[d].values())
            for d in depths
        ],
        "auc": depth_auc(depths, asr),
        "auc_ci95": bootstrap_mean(per_prompt),
    }


def plot_depth(curves: dict[str, dict], path: str | os.PathLike) -> None:
    """ASR (%) against prefill depth on a log axis with 95 % intervals, one line per model: {label: depth_curve}."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, c in curves.items():
        (line,) = ax.plot(c["depths"], [100 * a for a in c["asr"]], marker="o", label=f"{label} (area {c['auc']:.2f})")
        low, high = zip(*[(100 * lo, 100 * hi) for lo, hi in c["ci95"]])
        ax.fill_between(c["depths"], low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log")
    depths = sorted({d for c in curves.values() for d in c["depths"]})
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("prefilled tokens of a harmful response (log scale)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title("Prefill depth: ASR with 95 % intervals")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    write_png(path, fig)
