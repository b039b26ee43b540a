"""`derta calibrate`: score harmful and benign examples with a refusal-token model, sweep, write the results.

A model trained on `data build --refusal-tokens` rows starts refusals with `[refuse]` / `[refuse:CATEGORY]` and
was taught (RTO) to emit that token at any position of a harmful response. At inference (`inference.policy`)
a refusal token is emitted exactly when its probability reaches its threshold, at any generated position.

1. Score: for each example, P(next token = t) for every refusal token t at the start of the response and after
   each of its tokens (`eval.probe.token_probabilities`); an example's score for t is the highest of those
   (`--positions any`), or the first one (`--positions start`, Jain et al.'s setting).
2. Sweep and choose (`calibrate.sweep`).
3. Write calibration.json (thresholds, curves, per-category rates), scores.jsonl (the score table, which
   `--scores` re-calibrates without the model), calibration.png and report.md.

`derta eval --calibration calibration.json` generates with the chosen thresholds.
"""

from __future__ import annotations

from pathlib import Path

from derta.calibrate.sweep import calibrate_table, check_settings
from derta.data.sources import load_overrefusal_prompts, prompt_of, read_records
from derta.eval.probe import token_probabilities
from derta.files import fingerprints, lock_dir
from derta.io import InputError, pyplot, read_jsonl, write_json, write_jsonl, write_png, write_text
from derta.models.loading import check_model_files, load_model, load_tokenizer
from derta.models.refusal_tokens import REFUSAL_PHRASE, category_name, policy_tokens

RESPONSE_FIELDS = {"harmful": ("harmful_response", "response"), "benign": ("response",)}


def load_examples(path: str | Path, kind: str) -> list[dict]:
    """{"kind", "prompt", "response", "category"} rows from JSONL, or from XSTest's CSV (its unsafe prompts as
    harmful, its safe ones as benign). The response may be empty: then only the start is scored."""
    path = Path(path)
    if path.suffix == ".csv":
        want = "unsafe" if kind == "harmful" else "safe"
        rows = [
            {"kind": kind, "prompt": r["prompt"], "response": "", "category": None}
            for r in load_overrefusal_prompts(path)
            if r["label"] == want
        ]
        if not rows:
            raise InputError(f"no {want} prompts in this file", path)
        return rows
    rows = []
    for lineno, r in read_records(path):
        prompt = prompt_of(r, path, lineno)
        field = next((f for f in RESPONSE_FIELDS[kind] if f in r), None)
        if field is not None and not isinstance(r[field], str):
            raise InputError(f"field '{field}' must be a string", path, lineno)
        if r.get("category") is not None and not isinstance(r["category"], str):
            raise InputError("field 'category' must be a string", path, lineno)
        rows.append(
            {
                "kind": kind,
                "prompt": prompt,
                "response": r[field] if field else "",
                "category": category_name(r.get("category")),
            }
        )
    return rows


def score_examples(
    model,
    tokenizer,
    examples: list[dict],
    tokens: dict[str, int],
    template: str = "auto",
    batch_size: int = 16,
    progress: bool = False,
) -> list[dict]:
    """Each example with `scores` {token: max over positions of P(token)} and `start` {token: P at the start}."""

    names = list(tokens)
    probs = token_probabilities(
        model,
        tokenizer,
        [(e["prompt"], e["response"]) for e in examples],
        [tokens[t] for t in names],
        template,
        batch_size,
        progress,
        desc="calibrate",
    )
    return [
        {
            **e,
            "scores": {t: max(p[k] for p in ex) for k, t in enumerate(names)},
            "start": {t: ex[0][k] for k, t in enumerate(names)},
        }
        for e, ex in zip(examples, probs)
    ]


def load_scores(path: str | Path) -> list[dict]:
    """A scores.jsonl written by an earlier calibration (or any table of that shape)."""

    def probabilities(table) -> bool:
        return (
            isinstance(table, dict)
            and bool(table)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in table.values())
        )

    rows = []
    for lineno, r in read_jsonl(path, with_lines=True):
        if r.get("kind") not in ("harmful", "benign") or not probabilities(r.get("scores")):
            raise InputError(
                "row needs kind (harmful | benign) and scores {token: probability in [0, 1]}", path, lineno
            )
        if "start" in r and not probabilities(r["start"]):  # the first-token scores (--positions start)
            raise InputError("field 'start' must be {token: probability in [0, 1]}", path, lineno)
        rows.append({**r, "category": category_name(r.get("category"))})
    return rows


def plot_calibration(result: dict, path: str | Path) -> None:
    """Left: ROC-style curves (over-refusal -> refusal), overall and per token, operating point starred.
    Right: the dial, both overall rates against the allowance."""
    fig, (roc, dial) = pyplot().subplots(1, 2, figsize=(11, 4.5))
    _plot_roc(roc, result)
    _plot_dial(dial, result)
    fig.tight_layout()
    write_png(path, fig)


def _plot_roc(roc, result: dict) -> None:
    for t, info in result["tokens"].items():
        pts = [p for p in info["curve"] if p["refusal"] is not None and p["over_refusal"] is not None]
        if len(result["tokens"]) > 1 and pts:
            roc.plot(
                [p["over_refusal"] for p in pts],
                [p["refusal"] for p in pts],
                lw=1,
                alpha=0.6,
                drawstyle="steps-post",
                label=t,
            )
    curve = result["curve"]
    roc.plot(
        [p["over_refusal"] for p in curve],
        [p["refusal"] for p in curve],
        color="black",
        lw=2.2,
        drawstyle="steps-post",
        label="overall, any position (all tokens, generation's rule)",
    )
    start = "refusal_at_start" in curve[0]
    if start:  # what the first token alone decides: a plain prompt's refusal before any response text
        roc.plot(
            [p["over_refusal_at_start"] for p in curve],
            [p["refusal_at_start"] for p in curve],
            color="black",
            lw=1.5,
            ls="--",
            drawstyle="steps-post",
            label="overall, first token only",
        )
    op = result["operating_point"]
    roc.scatter(
        [op["over_refusal"]],
        [op["refusal"]],
        marker="*",
        s=220,
        color="red",
        zorder=5,
        label=f"chosen ({', '.join(f'{k} {v}' for k, v in result['target'].items())})",
    )
    roc.set_xlabel("benign examples refused (over-refusal) ↓")
    roc.set_ylabel("harmful examples refused ↑")
    roc.set_xlim(-0.02, 1.02)
    roc.set_ylim(-0.02, 1.02)
    roc.grid(alpha=0.3)
    roc.legend(fontsize=7, loc="lower right")
    roc.set_title("Refusal vs over-refusal as the thresholds move")


def _plot_dial(dial, result: dict) -> None:
    curve, op = result["curve"], result["operating_point"]
    start = "refusal_at_start" in curve[0]
    xs = [p["allowance"] for p in curve]
    dial.plot(xs, [p["refusal"] for p in curve], color="C0", drawstyle="steps-post", label="harmful refused")
    dial.plot(xs, [p["over_refusal"] for p in curve], color="C1", drawstyle="steps-post", label="benign refused")
    if start:
        dial.plot(
            xs,
            [p["refusal_at_start"] for p in curve],
            color="C0",
            ls="--",
            drawstyle="steps-post",
            label="harmful refused at the first token",
        )
        dial.plot(
            xs,
            [p["over_refusal_at_start"] for p in curve],
            color="C1",
            ls="--",
            drawstyle="steps-post",
            label="benign refused at the first token",
        )
    dial.axvline(op["allowance"], color="red", ls="--", lw=1, label="chosen")
    dial.set_xlabel("allowance (share of the benign examples each token may fire on)")
    dial.set_ylabel("rate")
    dial.set_ylim(-0.02, 1.02)
    dial.grid(alpha=0.3)
    dial.legend(fontsize=8)
    dial.set_title("The dial")


def report_markdown(result: dict) -> str:
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}"  # noqa: E731
    op = result["operating_point"]
    target = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result["target"].items())
    lines = [
        f"# Refusal-token calibration: {result.get('model', '')}",
        "",
        f"{result['n_harmful']} harmful and {result['n_benign']} benign examples; target: {target} "
        f"({'met' if op['meets_target'] else 'NOT met'}). At the chosen point the model refuses {pct(op['refusal'])} % of "
        f"the harmful examples and {pct(op['over_refusal'])} % of the benign ones (allowance {op['allowance']:.4g}). "
        + (
            "Scores: the probability of each refusal token at the first token of the response (`--positions start`); "
            if result.get("positions") == "start"
            else "Scores: the highest probability of each refusal token at the start of the response or after any of its "
            "tokens (teacher forced); "
        )
        + "an example counts as refused when any token reaches its threshold.",
        "",
        "Per token: its threshold, and its category's examples refused (by any token, as in generation).",
        "",
        "| Token | Threshold | Category's harmful refused ↑ | Category's benign refused ↓ | n harmful | n benign |",
        "|---|---|---|---|---|---|",
    ]
    for t, info in result["tokens"].items():
        lines.append(
            f"| `{t}` | {info['threshold']:.3g} | {pct(info['refusal'])} | {pct(info['over_refusal'])} | "
            f"{info['n_harmful']} | {info['n_benign']} |"
        )
    if "refusal_at_start" in op:
        lines[2] += (
            f" At the first token alone: {pct(op['refusal_at_start'])} % of the harmful and "
            f"{pct(op['over_refusal_at_start'])} % of the benign examples."
        )
    lines += ["", "![calibration](calibration.png)", ""]
    return "\n".join(lines)


def run_calibrate(
    out: str | Path,
    model: str | None = None,
    harmful: str | None = None,
    benign: str | None = None,
    scores: str | None = None,
    max_over_refusal: float | None = None,
    target_refusal: float | None = None,
    template: str = "auto",
    batch_size: int = 16,
    limit: int | None = None,
    progress: bool = True,
    refusal_phrase: str = REFUSAL_PHRASE,
    positions: str = "any",
) -> dict:
    """Score (or read `scores`), sweep, choose; writes OUT/calibration.json, scores.jsonl, calibration.png, report.md."""
    check_settings(max_over_refusal, target_refusal, positions)
    if scores:
        if model or harmful or benign:
            raise InputError("--scores re-calibrates a saved score table: leave out --model, --harmful and --benign")
        table = load_scores(scores)[:limit] if limit else load_scores(scores)
        source = {"scores": str(scores)}
    else:
        if not (model and harmful and benign):
            raise InputError("derta calibrate needs --model, --harmful and --benign (or --scores)")

        check_model_files(model)  # a broken model fails before the examples are read
        examples = load_examples(harmful, "harmful")[:limit] + load_examples(benign, "benign")[:limit]
        tokenizer = load_tokenizer(model)
        tokens = policy_tokens(tokenizer)
        if not tokens:
            raise InputError(
                "the model has no refusal tokens and no [RESET]: train it on rows from data build --refusal-tokens "
                "or --recipe backtrack",
                model,
            )
        table = score_examples(load_model(model), tokenizer, examples, tokens, template, batch_size, progress)
        source = {"model": str(model), "harmful": str(harmful), "benign": str(benign)}
    # The phrase travels with the thresholds: generation holds a fired token's next token to its transition; the
    # inputs' fingerprints let `derta eval --calibration` refuse the file for another model.
    result = {
        **source,
        **calibrate_table(table, max_over_refusal, target_refusal, positions),
        "refusal_phrase": refusal_phrase,
        "inputs": fingerprints({"--model": model, "--harmful": harmful, "--benign": benign, "--scores": scores}),
    }
    out = Path(out)
    lock_dir(out)
    if not scores:
        write_jsonl(out / "scores.jsonl", table)
    write_json(out / "calibration.json", result)
    plot_calibration(result, out / "calibration.png")
    write_text(out / "report.md", report_markdown(result))
    return result
