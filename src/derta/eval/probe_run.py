"""`derta probe`: the output probe (eval.probe) for one or several models, and with --directions what the hidden
states say at the same time: the harmfulness and refusal scores (eval.directions) at every position of prompt and
response, and each model's refusal cliff.

The scores' x axis puts the prompt's tokens on -1 .. 0 and the response on 0 .. 1, where 0 is the prompt's last
token: the position whose next-token probability is the output probe's first point, so the two line up over the
response. The cliff of one example is its highest refusal score over prompt and response minus its score at the last
position; a model's cliff is the mean over examples (with a bootstrap 95 % interval).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from derta.eval.directions import KINDS, check_fits, load_directions, position_scores
from derta.eval.probe import PROBE_POINTS, mean_curve, plot_curves, probe, probe_rows
from derta.eval.stats import bootstrap_mean
from derta.inference.shard import Shard
from derta.io import NUMERIC_RULES, InputError, check_number, pyplot, write_json, write_png
from derta.models.loading import load_model, load_tokenizer
from derta.models.refusal_tokens import REFUSAL_PHRASE


def score_curve(rows: list[dict], points: int = PROBE_POINTS) -> list[dict]:
    """Both scores averaged over examples: `points` points over the prompt (-1 .. 0) and `points` over the response
    (0 .. 1), position 0 (the prompt's last token) once."""
    curve = []
    for part, shift in (("prompt", -1.0), ("response", 0.0)):
        cut = [(r["prompt_tokens"], r) for r in rows]
        means = {}
        for kind in KINDS:
            per = [r[kind][:n] if part == "prompt" else r[kind][n - 1 :] for n, r in cut]
            grid, means[kind] = mean_curve(per, points)
        for k, f in enumerate(grid):
            if part == "response" and k == 0:
                continue
            curve.append({"position_frac": round(float(f + shift), 4), **{m: float(means[m][k]) for m in KINDS}})
    return curve


def scores_along(model, tokenizer, pairs, directions: str, loaded, template, batch_size, points) -> dict:
    """The --directions part of one model's probe: layers, the averaged scores, the cliff, and per-example scores.
    `loaded`: the directory's (tensors, info)."""
    tensors, info = loaded
    rows = position_scores(model, tokenizer, pairs, tensors, info, template, batch_size, progress=True)
    cliffs = [r["cliff"] for r in rows]
    return {
        "directions": str(directions),
        "layers": info["chosen_layer"],
        "cliff": {"mean": float(np.mean(cliffs)), "median": float(np.median(cliffs)), "ci95": bootstrap_mean(cliffs)},
        "score_curve": score_curve(rows, points),
        "per_example_scores": rows,
    }


def model_names(models: list[str]) -> list[str]:
    """Short names for plots: the directory names, or the paths themselves when two share a name."""
    names = [Path(m).name or str(m) for m in models]
    return names if len(set(names)) == len(names) else [str(m) for m in models]


def plot_inside(results: list[dict], names: list[str], path) -> None:
    """Three panels, one line per model: P(refusal token) over the response, then the refusal and harmfulness
    scores over prompt and response."""
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for name, r in zip(names, results):
        curve = r["curve"]
        axes[0].plot([c["position_frac"] for c in curve], [c["refusal_prob"] for c in curve], marker="o", label=name)
        inside = r.get("inside")
        if inside is None:
            continue
        xs = [c["position_frac"] for c in inside["score_curve"]]
        label = f"{name} (cliff {inside['cliff']['mean']:.2f})"
        for ax, kind in zip(axes[1:], KINDS[::-1]):
            ax.plot(xs, [c[kind] for c in inside["score_curve"]], marker=".", label=label)
    axes[0].set_ylabel("P(next token = refusal)")
    axes[0].set_ylim(-0.02, 1.02)
    axes[0].set_title("output: refusal probability")
    for ax, kind in zip(axes[1:], KINDS[::-1]):
        ax.axvline(0.0, color="grey", lw=1, ls="--")
        ax.axhline(0.0, color="grey", lw=0.5)
        ax.set_ylabel(f"{kind} score (0 harmless, 1 harmful mean)")
        ax.set_title(f"inside: {kind} direction")
        ax.set_xlabel("prompt (-1 .. 0) | harmful response (0 .. 1)")
    axes[0].set_xlabel("position in harmful response (fraction of its tokens)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_png(path, fig)


def run_probe(
    model_path: str | list[str],
    data: str,
    out: str,
    plot: str | None = None,
    refusal_phrase: str = REFUSAL_PHRASE,
    template: str = "auto",
    batch_size: int = 16,
    field: str | None = None,
    points: int = PROBE_POINTS,
    limit: int | None = None,
    directions: list[str] | None = None,
) -> dict:
    """One model: its probe result. Several: {"data", "field", "models": [result, ...]}, and one plot for all.
    `directions`: one directory for every model, or one per model."""
    check_number(points, "--points", NUMERIC_RULES["points"])
    models = [model_path] if isinstance(model_path, str) else list(model_path)
    directions = list(directions or [])
    if len(directions) not in (0, 1, len(models)):
        raise InputError(f"--directions: give one directory, or one per model ({len(models)}), not {len(directions)}")
    pairs, field = probe_rows(data, field, limit)
    shard = Shard.from_env()  # several processes (torchrun / accelerate launch): each probes every world-th batch
    if directions and shard.world > 1:
        raise InputError("--directions runs in one process: drop torchrun / accelerate launch")
    loaded = {d: load_directions(d) for d in directions}  # a bad directory fails before any model loads
    results = []
    for k, m in enumerate(models):
        tokenizer = load_tokenizer(m)
        model = load_model(m, device=shard.device)
        d = directions[k if len(directions) > 1 else 0] if directions else None
        if d:
            check_fits(model, loaded[d][0])
        result = {"model": str(m), "data": str(data), "field": field}
        result |= probe(model, tokenizer, pairs, refusal_phrase, template, batch_size, points, shard.main, shard)
        if d:
            result["inside"] = scores_along(model, tokenizer, pairs, d, loaded[d], template, batch_size, points)
        results.append(result)
    combined = results[0] if len(results) == 1 else {"data": str(data), "field": field, "models": results}
    if shard.main:
        write_json(out, combined)
        if plot and directions:
            plot_inside(results, model_names(models), plot)
        elif plot:
            plot_curves({n: r["curve"] for n, r in zip(model_names(models), results)}, plot)
    shard.wait()
    return combined


def kept_count(fraction: float, n: int) -> int:
    """How many of n rows a selection of `fraction` keeps: rounded up, at least one."""
    return max(1, math.ceil(fraction * n))


def select_by_cliff(
    rows: list[dict], model_path: str, directions: str, fraction: float, template: str = "auto", batch_size: int = 16
) -> tuple[list[dict], dict]:
    """The share `fraction` of safety triples with the largest refusal cliff under a model (teacher forced on
    instruction + harmful response, as `derta probe --directions`), in their own order, and a report of the cliffs.
    Ties keep the earlier row."""
    check_number(fraction, "--select-by-cliff", NUMERIC_RULES["select_by_cliff"])
    loaded = load_directions(directions)
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path)
    check_fits(model, loaded[0])
    pairs = [(r["instruction"], r["harmful_response"]) for r in rows]
    cliffs = [s["cliff"] for s in position_scores(model, tokenizer, pairs, *loaded, template, batch_size, True)]
    keep = kept_count(fraction, len(rows))
    chosen = sorted(sorted(range(len(rows)), key=lambda i: (-cliffs[i], i))[:keep])
    report = {
        "model": str(model_path),
        "directions": str(directions),
        "fraction": fraction,
        "n": len(rows),
        "kept": keep,
        "min_kept_cliff": min(cliffs[i] for i in chosen),
        "mean_cliff": float(np.mean(cliffs)),
        "mean_kept_cliff": float(np.mean([cliffs[i] for i in chosen])),
        "cliffs": cliffs,
    }
    return [rows[i] for i in chosen], report
