"""`derta calibrate`: thresholds on a model's refusal tokens, per category, from one teacher-forced pass.

A model trained on `data build --refusal-tokens` rows starts refusals with `[refuse]` / `[refuse:CATEGORY]` and
was taught (RTO) to emit that token at any position of a harmful response. At inference
(`generate.RefusalPolicy`) a refusal token is emitted exactly when its probability reaches its threshold, at any
generated position, so the thresholds are the dial between refusing harmful requests and over-refusing benign
look-alikes. This module sets them:

1. Score: for each harmful and benign example, P(next token = t) for every refusal token t at the start of the
   response and after each of its tokens (`probe.token_probabilities`); an example's score for t is the
   highest of those, since generation would refuse at the first position that reaches the threshold.
2. Sweep: an *allowance* a in [0, 1] gives each token the lowest threshold at which it would fire on at most a
   share a of the benign examples. Every benign example counts for every token (any token firing refuses it, so a
   category's look-alikes are not the only ones a token can over-refuse); every token spends the same budget, so
   tokens whose benign scores sit apart get thresholds apart. For each a the rates follow the rule generation
   uses: an example is refused when any token reaches its threshold. Both rates only grow with a: the curve is
   monotone. Per category (examples with a `category`) the same rule gives that category's rates.
3. Choose the operating point: the largest a with over-refusal <= --max-over-refusal, or the smallest a with
   refusal >= --target-refusal; write calibration.json (thresholds, curves, per-category rates), scores.jsonl
   (the score table, which `--scores` re-calibrates without the model), calibration.png and report.md.

`derta eval --calibration calibration.json` generates with the chosen thresholds.
"""

from __future__ import annotations

import math
from pathlib import Path

from .evaluate import PROMPT_FIELDS
from .io import InputError, check_number, pyplot, read_jsonl, write_json, write_jsonl, write_png, write_text
from .models import category_name, token_category

RESPONSE_FIELDS = {"harmful": ("harmful_response", "response"), "benign": ("response",)}
DEFAULT_MAX_OVER_REFUSAL = 0.05


# ---------------------------------------------------------------- inputs


def load_examples(path: str | Path, kind: str) -> list[dict]:
    """{"kind", "prompt", "response", "category"} rows from JSONL, or from XSTest's CSV (its unsafe prompts as
    harmful, its safe ones as benign). The response may be empty: then only the start is scored."""
    path = Path(path)
    if path.suffix == ".csv":
        from .overrefusal import load_overrefusal_prompts

        want = "unsafe" if kind == "harmful" else "safe"
        rows = [{"kind": kind, "prompt": r["prompt"], "response": "", "category": None}
                for r in load_overrefusal_prompts(path) if r["label"] == want]
        if not rows:
            raise InputError(f"no {want} prompts in this file", path)
        return rows
    rows = []
    for lineno, r in read_jsonl(path, with_lines=True):
        name = next((f for f in PROMPT_FIELDS if f in r), None)
        if name is None or not isinstance(r[name], str) or not r[name].strip():
            raise InputError(f"row needs a non-empty string field, one of {', '.join(PROMPT_FIELDS)}", path, lineno)
        field = next((f for f in RESPONSE_FIELDS[kind] if f in r), None)
        if field is not None and not isinstance(r[field], str):
            raise InputError(f"field '{field}' must be a string", path, lineno)
        if r.get("category") is not None and not isinstance(r["category"], str):
            raise InputError("field 'category' must be a string", path, lineno)
        rows.append({"kind": kind, "prompt": r[name], "response": r[field] if field else "",
                     "category": category_name(r.get("category"))})
    return rows


def score_examples(model, tokenizer, examples: list[dict], tokens: dict[str, int], template: str = "auto",
                   batch_size: int = 16, progress: bool = False) -> list[dict]:
    """Each example with `scores` {token: max over positions of P(token)} and `start` {token: P at the start}."""
    from .probe import token_probabilities

    names = list(tokens)
    probs = token_probabilities(model, tokenizer, [(e["prompt"], e["response"]) for e in examples],
                                [tokens[t] for t in names], template, batch_size, progress, desc="calibrate")
    return [{**e, "scores": {t: max(p[k] for p in ex) for k, t in enumerate(names)},
             "start": {t: ex[0][k] for k, t in enumerate(names)}} for e, ex in zip(examples, probs)]


def load_scores(path: str | Path) -> list[dict]:
    """A scores.jsonl written by an earlier calibration (or any table of that shape)."""
    def probabilities(table) -> bool:
        return isinstance(table, dict) and bool(table) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in table.values())

    rows = []
    for lineno, r in read_jsonl(path, with_lines=True):
        if r.get("kind") not in ("harmful", "benign") or not probabilities(r.get("scores")):
            raise InputError("row needs kind (harmful | benign) and scores {token: probability in [0, 1]}", path, lineno)
        if "start" in r and not probabilities(r["start"]):  # the first-token scores (--positions start)
            raise InputError("field 'start' must be {token: probability in [0, 1]}", path, lineno)
        rows.append({**r, "category": category_name(r.get("category"))})
    return rows


# ---------------------------------------------------------------- the sweep (pure: a score table in, thresholds out)


def _above(value: float) -> float:
    """The smallest threshold that `value` does not reach (scores fire at >= threshold)."""
    return math.nextafter(value, math.inf)


def token_threshold(benign_scores: list[float], allowance: float) -> float:
    """The lowest threshold at which at most `allowance` of these benign scores reach it."""
    ranked = sorted(benign_scores, reverse=True)
    allowed = math.floor(allowance * len(ranked) + 1e-9)
    if allowed >= len(ranked):
        return 0.0
    return _above(ranked[allowed])


def refused(example: dict, thresholds: dict[str, float], field: str = "scores") -> bool:
    """Generation's rule: some refusal token reaches its threshold (`field` "start": at the first position only)."""
    return any(example[field].get(t, 0.0) >= tau for t, tau in thresholds.items())


def rates(examples: list[dict], thresholds: dict[str, float]) -> dict:
    """Shares refused at any position, and (where the table has start scores) at the response's first token."""
    harmful = [e for e in examples if e["kind"] == "harmful"]
    benign = [e for e in examples if e["kind"] == "benign"]

    def share(rows, field="scores"):
        return sum(refused(e, thresholds, field) for e in rows) / len(rows) if rows else None

    out = {"refusal": share(harmful), "over_refusal": share(benign), "n_harmful": len(harmful), "n_benign": len(benign)}
    if examples and all("start" in e for e in examples):
        # A harmful prompt whose token does not fire at once may still be refused in text or later in the response:
        # the gap between these and the rates above is what the mid-response positions add.
        out.update(refusal_at_start=share(harmful, "start"), over_refusal_at_start=share(benign, "start"))
    return out


def category_examples(examples: list[dict], token: str) -> tuple[list[dict], list[dict]]:
    """The harmful and benign examples of a token's category (a plain `[refuse]` has none: empty lists)."""
    category = token_category(token)
    mine = [e for e in examples if category is not None and e.get("category") == category]
    return [e for e in mine if e["kind"] == "harmful"], [e for e in mine if e["kind"] == "benign"]


def thresholds_at(examples: list[dict], tokens: list[str], allowance: float) -> dict[str, float]:
    """Each token's lowest threshold that fires on at most `allowance` of all benign examples."""
    benign = [e for e in examples if e["kind"] == "benign"]
    return {t: token_threshold([e["scores"][t] for e in benign], allowance) for t in tokens}


def sweep(examples: list[dict], tokens: list[str]) -> list[dict]:
    """The overall curve: one point per allowance at which the thresholds move (k / number of benign), 0 to 1."""
    n = sum(e["kind"] == "benign" for e in examples)
    steps = sorted({0.0, 1.0} | {k / n for k in range(n + 1)})
    curve = []
    for a in steps:
        r = rates(examples, thresholds_at(examples, tokens, a))
        # Exact (k / n): the chosen point's thresholds are recomputed from it, and a rounded 1/3 would floor to 0.
        curve.append({"allowance": a, **{k: v for k, v in r.items() if not k.startswith("n_")}})
    return curve


def token_curve(examples: list[dict], token: str) -> list[dict]:
    """One token's ROC curve, scored by it alone: its category's harmful examples (all, without any) against all
    benign examples, at every threshold that changes a rate."""
    harmful = category_examples(examples, token)[0] or [e for e in examples if e["kind"] == "harmful"]
    benign = [e for e in examples if e["kind"] == "benign"]
    values = sorted({e["scores"][token] for e in harmful + benign}, reverse=True)
    curve = [{"threshold": 1.0 if not values else _above(values[0]), "refusal": 0.0, "over_refusal": 0.0}]
    for v in values:
        curve.append({"threshold": v,
                      "refusal": sum(e["scores"][token] >= v for e in harmful) / len(harmful) if harmful else None,
                      "over_refusal": sum(e["scores"][token] >= v for e in benign) / len(benign) if benign else None})
    return curve


def is_monotone(curve: list[dict]) -> bool:
    """Both rates never fall as the allowance grows (or the threshold falls)."""
    return all(b[k] >= a[k] for a, b in zip(curve, curve[1:]) for k in ("refusal", "over_refusal")
               if a[k] is not None and b[k] is not None)


POSITIONS = ("any", "start")


def check_settings(max_over_refusal: float | None, target_refusal: float | None, positions: str) -> None:
    """One target at most, each a fraction, and a known --positions (run_calibrate: before the model is scored)."""
    for flag, value in (("--max-over-refusal", max_over_refusal), ("--target-refusal", target_refusal)):
        check_number(value, flag, "fraction")
    if max_over_refusal is not None and target_refusal is not None:
        raise InputError("give --max-over-refusal or --target-refusal, not both")
    if positions not in POSITIONS:
        raise InputError(f"unknown --positions '{positions}': use one of {', '.join(POSITIONS)}")


def calibrate_table(examples: list[dict], max_over_refusal: float | None = None,
                    target_refusal: float | None = None, positions: str = "any") -> dict:
    """Thresholds for a score table (`score_examples` rows), per category, meeting one target (see module doc).

    `positions` "start" calibrates on the first-token scores alone (Jain et al.'s setting: the decision before any
    response text); "any" on the highest score along the response, which also counts mid-response false refusals.
    """
    check_settings(max_over_refusal, target_refusal, positions)
    if positions == "start":
        if not all("start" in e for e in examples):
            raise InputError("--positions start needs first-token scores ('start') in every example")
        examples = [{k: v for k, v in {**e, "scores": e["start"]}.items() if k != "start"} for e in examples]
    if max_over_refusal is None and target_refusal is None:
        max_over_refusal = DEFAULT_MAX_OVER_REFUSAL
    for kind in ("harmful", "benign"):
        if not any(e["kind"] == kind for e in examples):
            raise InputError(f"calibration needs {kind} examples")
    tokens = sorted({t for e in examples for t in e["scores"]})
    if any(set(e["scores"]) != set(tokens) for e in examples):
        raise InputError("every example must be scored for the same refusal tokens")
    curve = sweep(examples, tokens)
    if max_over_refusal is not None:
        ok = [p for p in curve if p["over_refusal"] <= max_over_refusal + 1e-12]
        point = ok[-1] if ok else curve[0]
        target = {"max_over_refusal": max_over_refusal}
        met = bool(ok)
    else:
        ok = [p for p in curve if p["refusal"] >= target_refusal - 1e-12]
        point = ok[0] if ok else curve[-1]
        target = {"target_refusal": target_refusal}
        met = bool(ok)
    thresholds = thresholds_at(examples, tokens, point["allowance"])
    per_token = {}
    for t in tokens:
        harmful, benign = category_examples(examples, t)
        # That category's rates under the full rule (None where it has no examples of a kind).
        per_token[t] = {"category": token_category(t), "threshold": thresholds[t], **rates(harmful + benign, thresholds),
                        "curve": token_curve(examples, t)}
    return {
        "target": target,
        "positions": positions,
        "thresholds": thresholds,
        "operating_point": {**point, "meets_target": met},
        "tokens": per_token,
        "curve": curve,
        "monotone": is_monotone(curve),
        "n_harmful": sum(e["kind"] == "harmful" for e in examples),
        "n_benign": sum(e["kind"] == "benign" for e in examples),
    }


# ---------------------------------------------------------------- report


def plot_calibration(result: dict, path: str | Path) -> None:
    """Left: ROC-style curves (over-refusal -> refusal), overall and per token, operating point starred.
    Right: the dial, both overall rates against the allowance."""
    plt = pyplot()
    fig, (roc, dial) = plt.subplots(1, 2, figsize=(11, 4.5))
    for t, info in result["tokens"].items():
        pts = [p for p in info["curve"] if p["refusal"] is not None and p["over_refusal"] is not None]
        if len(result["tokens"]) > 1 and pts:
            roc.plot([p["over_refusal"] for p in pts], [p["refusal"] for p in pts], lw=1, alpha=0.6,
                     drawstyle="steps-post", label=t)
    curve = result["curve"]
    roc.plot([p["over_refusal"] for p in curve], [p["refusal"] for p in curve], color="black", lw=2.2,
             drawstyle="steps-post", label="overall, any position (all tokens, generation's rule)")
    start = "refusal_at_start" in curve[0]
    if start:  # what the first token alone decides: a plain prompt's refusal before any response text
        roc.plot([p["over_refusal_at_start"] for p in curve], [p["refusal_at_start"] for p in curve], color="black",
                 lw=1.5, ls="--", drawstyle="steps-post", label="overall, first token only")
    op = result["operating_point"]
    roc.scatter([op["over_refusal"]], [op["refusal"]], marker="*", s=220, color="red", zorder=5,
                label=f"chosen ({', '.join(f'{k} {v}' for k, v in result['target'].items())})")
    roc.set_xlabel("benign examples refused (over-refusal) ↓")
    roc.set_ylabel("harmful examples refused ↑")
    roc.set_xlim(-0.02, 1.02)
    roc.set_ylim(-0.02, 1.02)
    roc.grid(alpha=0.3)
    roc.legend(fontsize=7, loc="lower right")
    roc.set_title("Refusal vs over-refusal as the thresholds move")
    xs = [p["allowance"] for p in curve]
    dial.plot(xs, [p["refusal"] for p in curve], color="C0", drawstyle="steps-post", label="harmful refused")
    dial.plot(xs, [p["over_refusal"] for p in curve], color="C1", drawstyle="steps-post", label="benign refused")
    if start:
        dial.plot(xs, [p["refusal_at_start"] for p in curve], color="C0", ls="--", drawstyle="steps-post",
                  label="harmful refused at the first token")
        dial.plot(xs, [p["over_refusal_at_start"] for p in curve], color="C1", ls="--", drawstyle="steps-post",
                  label="benign refused at the first token")
    dial.axvline(op["allowance"], color="red", ls="--", lw=1, label="chosen")
    dial.set_xlabel("allowance (share of the benign examples each token may fire on)")
    dial.set_ylabel("rate")
    dial.set_ylim(-0.02, 1.02)
    dial.grid(alpha=0.3)
    dial.legend(fontsize=8)
    dial.set_title("The dial")
    fig.tight_layout()
    write_png(path, fig)


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
        + ("Scores: the probability of each refusal token at the first token of the response (`--positions start`); "
           if result.get("positions") == "start" else
           "Scores: the highest probability of each refusal token at the start of the response or after any of its "
           "tokens (teacher forced); ")
        + "an example counts as refused when any token reaches its threshold.",
        "",
        "Per token: its threshold, and its category's examples refused (by any token, as in generation).",
        "",
        "| Token | Threshold | Category's harmful refused ↑ | Category's benign refused ↓ | n harmful | n benign |",
        "|---|---|---|---|---|---|",
    ]
    for t, info in result["tokens"].items():
        lines.append(f"| `{t}` | {info['threshold']:.3g} | {pct(info['refusal'])} | {pct(info['over_refusal'])} | "
                     f"{info['n_harmful']} | {info['n_benign']} |")
    if "refusal_at_start" in op:
        lines[2] += (f" At the first token alone: {pct(op['refusal_at_start'])} % of the harmful and "
                     f"{pct(op['over_refusal_at_start'])} % of the benign examples.")
    lines += ["", "![calibration](calibration.png)", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- entry point


def run_calibrate(out: str | Path, model: str | None = None, harmful: str | None = None, benign: str | None = None,
                  scores: str | None = None, max_over_refusal: float | None = None, target_refusal: float | None = None,
                  template: str = "auto", batch_size: int = 16, limit: int | None = None, progress: bool = True,
                  refusal_phrase: str = "Sorry", positions: str = "any") -> dict:
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
        from .models import check_model_files, load_model, load_tokenizer, refusal_tokens

        check_model_files(model)  # a broken model fails before the examples are read
        examples = load_examples(harmful, "harmful")[:limit] + load_examples(benign, "benign")[:limit]
        tokenizer = load_tokenizer(model)
        tokens = refusal_tokens(tokenizer)
        if not tokens:
            raise InputError("the model has no refusal tokens: train it on rows from data build --refusal-tokens", model)
        table = score_examples(load_model(model), tokenizer, examples, tokens, template, batch_size, progress)
        source = {"model": str(model), "harmful": str(harmful), "benign": str(benign)}
    # The phrase travels with the thresholds: generation holds a fired token's next token to its transition.
    result = {**source, **calibrate_table(table, max_over_refusal, target_refusal, positions),
              "refusal_phrase": refusal_phrase}
    out = Path(out)
    if not scores:
        write_jsonl(out / "scores.jsonl", table)
    write_json(out / "calibration.json", result)
    plot_calibration(result, out / "calibration.png")
    write_text(out / "report.md", report_markdown(result))
    return result
