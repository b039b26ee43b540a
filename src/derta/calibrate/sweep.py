"""The threshold sweep of `derta calibrate`: a score table in, per-category thresholds out (no model).

An *allowance* a in [0, 1] gives each refusal token the lowest threshold at which it would fire on at most a
share a of the benign examples. Every benign example counts for every token (any token firing refuses it, so a
category's look-alikes are not the only ones a token can over-refuse); every token spends the same budget, so
tokens whose benign scores sit apart get thresholds apart. For each a the rates follow the rule generation
uses (`inference.policy`): an example is refused when any token reaches its threshold. Both rates only grow
with a, so the curve is monotone. The operating point is the largest a with over-refusal <= --max-over-refusal,
or the smallest a with refusal >= --target-refusal.
"""

from __future__ import annotations

import math

from derta.io import InputError, check_number
from derta.models.refusal_tokens import token_category

DEFAULT_MAX_OVER_REFUSAL = 0.05


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
        curve.append(
            {
                "threshold": v,
                "refusal": sum(e["scores"][token] >= v for e in harmful) / len(harmful) if harmful else None,
                "over_refusal": sum(e["scores"][token] >= v for e in benign) / len(benign) if benign else None,
            }
        )
    return curve


def is_monotone(curve: list[dict]) -> bool:
    """Both rates never fall as the allowance grows (or the threshold falls)."""
    return all(
        b[k] >= a[k]
        for a, b in zip(curve, curve[1:])
        for k in ("refusal", "over_refusal")
        if a[k] is not None and b[k] is not None
    )


POSITIONS = ("any", "start")


def check_settings(max_over_refusal: float | None, target_refusal: float | None, positions: str) -> None:
    """One target at most, each a fraction, and a known --positions (run_calibrate: before the model is scored)."""
    for flag, value in (("--max-over-refusal", max_over_refusal), ("--target-refusal", target_refusal)):
        check_number(value, flag, "fraction")
    if max_over_refusal is not None and target_refusal is not None:
        raise InputError("give --max-over-refusal or --target-refusal, not both")
    if positions not in POSITIONS:
        raise InputError(f"unknown --positions '{positions}': use one of {', '.join(POSITIONS)}")


def calibrate_table(
    examples: list[dict],
    max_over_refusal: float | None = None,
    target_refusal: float | None = None,
    positions: str = "any",
) -> dict:
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
        per_token[t] = {
            "category": token_category(t),
            "threshold": thresholds[t],
            **rates(harmful + benign, thresholds),
            "curve": token_curve(examples, t),
        }
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
