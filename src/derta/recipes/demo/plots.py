"""The demo's plots: refusal probability along the response, prefill attack success, over-refusal, the dial."""

from __future__ import annotations

from pathlib import Path

from derta.data.recipes import RECIPES
from derta.eval.probe import plot_curves
from derta.io import pyplot, write_png
from derta.recipes.demo.config import DemoConfig


def model_title(name: str) -> str:
    """How tables and plots name a model of the demo: the untuned reference, or its recipe's title."""
    return "Base (unaligned)" if name == "base" else RECIPES[name].title


def plot_dial(points: list[dict], path: Path) -> None:
    """Held-out rates against the calibration's over-refusal target (the no-threshold point left out)."""
    pts = [p for p in points if p["max_over_refusal"] is not None]
    fig, ax = pyplot().subplots(figsize=(6, 4))
    xs = [p["max_over_refusal"] for p in pts]
    for key, label, style in (
        ("fired_harmful", "harmful: token fired", "-o"),
        ("fired_lookalike", "look-alikes: token fired", "-o"),
        ("refusal", "harmful: visibly refused", "--s"),
        ("over_refusal", "look-alikes: visibly refused", "--s"),
        ("prefill_asr", "prefill attack success", ":^"),
    ):
        ax.plot(xs, [p[key] for p in pts], style, label=label)
    ax.set_xlabel("over-refusal target the thresholds were calibrated for")
    ax.set_ylabel("rate on the held-out test split")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Refusal tokens: moving the threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_png(path, fig)


def plot_overrefusal(results: dict, path: Path) -> None:
    """Each model as a point: safe prompts refused (x, lower is better) against unsafe prompts refused (y, higher)."""
    fig, ax = pyplot().subplots(figsize=(5, 4))
    names = {"base": "base", **{r: recipe.title for r, recipe in RECIPES.items()}}
    for k, m in results.items():
        if "overrefusal" in m:
            o = m["overrefusal"]
            ax.scatter(o["safe_refusal"], o["unsafe_refusal"], s=60)
            ax.annotate(
                names[k],
                (o["safe_refusal"], o["unsafe_refusal"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("safe prompts refused (over-refusal) ↓")
    ax.set_ylabel("unsafe prompts refused ↑")
    ax.set_title("Over-refusal trade-off")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)


def plot_probe(results: dict, path: Path) -> None:

    names = {"base": "base", **{r: recipe.title for r, recipe in RECIPES.items()}}
    plot_curves(
        {names[k]: m["probe_curve"] for k, m in results.items()},
        path,
        title="P(refusal token) along held-out harmful responses",
    )


def plot_prefill(results: dict, cfg: DemoConfig, path: Path) -> None:
    plt = pyplot()
    names = [k for k in results if k != "base"]
    fr = [str(f) for f in cfg.prefill_fractions]
    width = 0.8 / len(fr)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names) + 2), 4.5))  # every recipe's label readable
    for j, f in enumerate(fr):
        xs = [i + j * width for i in range(len(names))]
        asr = [results[n]["prefill_asr"][f] for n in names]
        ax.bar(xs, asr, width, color=f"C{j}", label=f"prefill {int(float(f) * 100)}%")
        # Hatched, on top: continuations that do not refuse but are not harmful text either (looping, empty).
        ax.bar(
            xs,
            [max(0.0, results[n]["prefill_not_refused"][f] - a) for a, n in zip(asr, names)],
            width,
            bottom=asr,
            fill=False,
            hatch="//",
            edgecolor="black",
            linewidth=0,
            label="not refused, not harmful (degenerate)" if j == 0 else None,
        )
        for x, a in zip(xs, asr):
            ax.text(x, a + 0.01, f"{100 * a:.0f}", ha="center", fontsize=7)
    ax.set_xticks([i + width * (len(fr) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([RECIPES[n].title for n in names], fontsize=8, rotation=30, ha="right")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.1)
    ax.set_title("Prefill attack success on held-out harmful prompts")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)


def plot_real_depth(results: dict, path: Path) -> None:
    """ASR against the number of the untuned model's own tokens prefilled (log axis), one line per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, m) in enumerate(results.items()):
        d = m.get("real", {}).get("donotanswer_own_prefix", {}).get("depth")
        if d:
            ax.plot(d["depths"], d["asr"], "o-", color=f"C{i}", label=f"{model_title(name)} (area {d['auc']:.2f})")
            lo, hi = zip(*[c if c else (a, a) for c, a in zip(d["ci95"], d["asr"])])
            ax.fill_between(d["depths"], lo, hi, color=f"C{i}", alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("prefilled tokens of the untuned model's own answer")
    ax.set_ylabel("attack success rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("Prefill depth on held-out DoNotAnswer prompts (95 % intervals)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_png(path, fig)
