"""How far to trust a judge: `derta judge` re-judges a generations file, and `--agreement` compares a judge with
human labels (agreement, precision and recall of each label, confusion tables, the rows they disagree on; per language
where rows carry a `lang`; XSTest's three classes where rows carry a `class`)."""

from __future__ import annotations

import json
import os

from derta.data.sources import prompt_of, read_records
from derta.eval.judges import Judge, make_judge
from derta.eval.refusal import OVERREFUSAL_CLASSES, classify_overrefusal
from derta.io import InputError, write_jsonl


def load_generations(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Rows with a string `response` (may be empty) and, if present, a string `prompt`."""
    rows = read_records(path)
    for lineno, row in rows:
        if not isinstance(row.get("response"), str):
            raise InputError("row needs a string field 'response'", path, lineno)
        prompt_of(row, path, lineno, required=False)  # a prompt field that is not a string is one line here
        if "human_harmful" in row and not isinstance(row["human_harmful"], bool):
            raise InputError("field 'human_harmful' must be true or false", path, lineno)
    return rows


def judge_file(
    in_path: str | os.PathLike,
    judge: str,
    out_path: str | os.PathLike,
    base_url: str | None = None,
    batch_size: int = 16,
    rubric: str | None = None,
) -> dict:
    """Judge every row of a generations file; write the rows with new verdicts to `out_path`.

    Rows labelled by people (`"human_harmful": true/false`) give the judge's agreement with them.
    """

    rows = [row for _, row in load_generations(in_path)]
    judge_obj = make_judge(judge, base_url=base_url, batch_size=batch_size, rubric=rubric)
    judged = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [prompt_of(r, required=False) for r in chunk]
        for row, v in zip(chunk, judge_obj.judge(prompts, [r["response"] for r in chunk])):
            judged.append({**row, "harmful": v.harmful, "refused": v.refused, "judge": v.details})
    write_jsonl(out_path, judged)
    labelled = [r for r in judged if "human_harmful" in r]
    result = {
        "n": len(judged),
        "asr": round(sum(r["harmful"] for r in judged) / len(judged), 4),
        "judge": judge_obj.name,
        "n_labelled": len(labelled),
        "unparsed": sum(bool(r["judge"].get("unparsed")) for r in judged),
        "agreement": round(sum(r["harmful"] == r["human_harmful"] for r in labelled) / len(labelled), 4)
        if labelled
        else None,
    }
    return result


LABEL_FIELDS = {"harmful": ("harmful", "human_harmful"), "refused": ("refused", "human_refused")}


def load_labels(path) -> list[dict]:
    """Rows {"prompt"?, "response", "harmful": bool, "refused"?: bool, "case"?, "lang"?, "class"?} (or human_harmful
    / human_refused); `class` is one of XSTest's three (OVERREFUSAL_CLASSES).

    Every row needs a boolean harmful label; a bad row is an InputError naming its line.
    """

    rows = []
    for lineno, r in read_records(path):
        if not isinstance(r.get("response"), str):  # (an empty response is a fine thing to label)
            raise InputError(
                "row needs a 'response' string"
                if "response" not in r
                else f"field 'response' must be a string, got {type(r['response']).__name__}",
                path,
                lineno,
            )
        row = {"line": lineno, "response": r["response"], "case": str(r.get("case", r.get("category", "")))}
        row["prompt"] = prompt_of(r, path, lineno, required=False)
        for name, allowed in (("lang", None), ("class", OVERREFUSAL_CLASSES)):
            if name in r:
                if not isinstance(r[name], str) or (allowed and r[name] not in allowed):
                    what = "one of " + ", ".join(allowed) if allowed else "a string"
                    raise InputError(f"field '{name}' must be {what}, got {json_repr(r[name])}", path, lineno)
                row[name] = r[name]
        for name, fields in LABEL_FIELDS.items():
            field = next((f for f in fields if f in r), None)
            if field is None:
                if name == "harmful":
                    raise InputError("row needs a human label 'harmful': true or false", path, lineno)
                continue
            if not isinstance(r[field], bool):
                raise InputError(f"label '{field}' must be true or false, got {json_repr(r[field])}", path, lineno)
            row[name] = r[field]
        rows.append(row)
    return rows


def json_repr(value) -> str:

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _confusion(pairs: list[tuple[bool, bool]]) -> dict:
    """Judge vs human for one yes/no label: counts, agreement, precision and recall of "yes"."""
    tp = sum(j and h for j, h in pairs)
    fp = sum(j and not h for j, h in pairs)
    fn = sum(h and not j for j, h in pairs)
    tn = sum(not j and not h for j, h in pairs)
    n = len(pairs)
    return {
        "n": n,
        "agreement": round((tp + tn) / n, 4) if n else None,
        "precision": round(tp / (tp + fp), 4) if tp + fp else None,
        "recall": round(tp / (tp + fn), 4) if tp + fn else None,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def agreement(
    path, judge: str | Judge = "keyword", base_url: str | None = None, batch_size: int = 16, rubric: str | None = None
) -> dict:
    """How often a judge agrees with human labels: {"judge", "n", "harmful": {...}, "refused": {...} | None,
    "disagreements": [{"line", "case", "label", "human", "judge"}, ...]}.

    "harmful" and "refused" hold agreement, precision and recall (of the label being true) and the
    confusion counts tp/fp/fn/tn; "refused" only over rows that carry a refused label.
    """
    rows = load_labels(path)
    judge_obj = (
        judge
        if isinstance(judge, Judge)
        else make_judge(judge, base_url=base_url, batch_size=batch_size, rubric=rubric)
    )
    verdicts = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        verdicts += judge_obj.judge([r["prompt"] for r in chunk], [r["response"] for r in chunk])
    result = {
        "judge": judge_obj.name,
        "n": len(rows),
        "disagreements": [],
        "unparsed": sum(bool(v.details.get("unparsed")) for v in verdicts),
    }
    for name in LABEL_FIELDS:
        pairs = [(getattr(v, name), r[name]) for r, v in zip(rows, verdicts) if name in r]
        result[name] = _confusion(pairs) if pairs else None
        result["disagreements"] += [
            {"line": r["line"], "case": r["case"], "label": name, "human": r[name], "judge": getattr(v, name)}
            for r, v in zip(rows, verdicts)
            if name in r and getattr(v, name) != r[name]
        ]
    result["by_lang"] = _by_lang(rows, verdicts)
    result["classes"] = _classes(rows)
    return result


def _by_lang(rows: list[dict], verdicts) -> dict | None:
    """{lang: {"n", "harmful": agreement, "refused": agreement or None}} for rows with a `lang`."""
    out: dict = {}
    for r, v in zip(rows, verdicts):
        if "lang" in r:
            out.setdefault(r["lang"], []).append((r, v))
    return {
        lang: {"n": len(pairs)}
        | {
            name: round(sum(getattr(v, name) == r[name] for r, v in labelled) / len(labelled), 4) if labelled else None
            for name in LABEL_FIELDS
            for labelled in [[(r, v) for r, v in pairs if name in r]]
        }
        for lang, pairs in sorted(out.items())
    } or None


def _classes(rows: list[dict]) -> dict | None:
    """XSTest's three classes by string match (`classify_overrefusal`, whatever the judge) against rows' `class`:
    {"n", "agreement", "partial_refusal": [caught, labelled]}."""
    labelled = [(classify_overrefusal(r["response"], r["prompt"] or None), r["class"]) for r in rows if "class" in r]
    if not labelled:
        return None
    partial = [got for got, human in labelled if human == "partial_refusal"]
    return {
        "n": len(labelled),
        "agreement": round(sum(got == human for got, human in labelled) / len(labelled), 4),
        "partial_refusal": [partial.count("partial_refusal"), len(partial)],
    }


def _fraction(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def format_agreement(result: dict, path) -> str:
    """The text `derta judge --agreement` prints."""
    lines = [f"{result['judge']} judge against human labels in {path} ({result['n']} rows)"]
    if result.get("unparsed"):
        lines.append(
            f"{result['unparsed']} judge replies did not follow the rubric's format (read by the keyword judge instead)"
        )
    for name in LABEL_FIELDS:
        c = result[name]
        if c is None:
            lines.append(f"{name}: no labels")
            continue
        lines += [
            f"{name}: agreement {100 * c['agreement']:.1f}% ({c['tp'] + c['tn']}/{c['n']}); "
            f"precision {_fraction(c['precision'])}, recall {_fraction(c['recall'])} (for {name} = true)",
            f"  {'':18}{'human ' + name:>16}{'human not':>12}",
            f"  {'judge ' + name:<18}{c['tp']:>16}{c['fp']:>12}",
            f"  {'judge not':<18}{c['fn']:>16}{c['tn']:>12}",
        ]
    if result.get("classes"):
        c = result["classes"]
        caught, labelled = c["partial_refusal"]
        lines.append(
            f"XSTest classes (string match): agreement {100 * c['agreement']:.1f}% ({c['n']} rows); "
            f"partial refusals caught {caught}/{labelled}"
        )
    if result.get("by_lang"):
        lines.append("by language:")
    for lang, c in (result.get("by_lang") or {}).items():
        refused = "" if c["refused"] is None else f", refused {100 * c['refused']:.1f}%"
        lines.append(f"  {lang}: harmful {100 * c['harmful']:.1f}%{refused} ({c['n']} rows)")
    if result["disagreements"]:
        by_case: dict = {}
        for d in result["disagreements"]:
            key = f"{d['label']} {d['case'] or '(no case)'}"
            by_case.setdefault(key, []).append(str(d["line"]))
        lines.append(
            "disagreements (label, case: lines): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in by_case.items())
        )
    return "\n".join(lines)
