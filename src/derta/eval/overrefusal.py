"""`derta eval-overrefusal`: does a model answer safe prompts that look unsafe, and still refuse their unsafe contrasts?

    derta eval-overrefusal --model M --prompts FILE --out DIR

FILE is XSTest's CSV as published (prompt, type, label) or JSONL rows with a prompt and a `label`
(safe | unsafe, optional `type`). XSTest itself (CC-BY-4.0) is not shipped: it is for evaluation,
and the user points at it. The report gives the refusal rate on each half, per prompt type too, by
`eval.refusal.refuses`: a refusal-word loop counts as refusing a safe prompt but not an unsafe one.
DIR is a run directory (`eval.runner`): rerunning the same command resumes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from derta.data.sources import LABELS, load_overrefusal_prompts
from derta.eval.refusal import OVERREFUSAL_CLASSES, classify_overrefusal, refuses
from derta.eval.runner import RunDir, ordered_rows, run_task, text_sha256
from derta.eval.stats import ci95, with_interval
from derta.inference.base import GenInput
from derta.io import write_json, write_text

OVERREFUSAL_MAX_NEW_TOKENS = 64  # enough to tell an answer from a refusal


def refused(response: str, label: str) -> bool:
    return refuses(response, harmful=label == "unsafe")


def score_overrefusal(prompts: list[dict], responses: list[str], resets: list[bool] | None = None) -> dict:
    """Refusal rate per half, XSTest's three classes per half (`classify_overrefusal`), and per type, each rate with
    its 95 % Wilson interval; with `resets` (whose responses a backtracking model reset, `inference.base`), the
    reset rate per half too: on safe prompts a reset is a needless one, the backtracking cost beside over-refusal.

    {"safe_refusal", "unsafe_refusal", "n_safe", "n_unsafe", "classes": {label: {class: share}},
     "by_type": {type: {"label", "refusal", "n", "ci95"}},
     "ci95": {"safe_refusal": [low, high], "unsafe_refusal": [...], "classes": {label: {class: [low, high]}}}}
    """
    block: dict = {"classes": {}}
    intervals: dict = {"classes": {}}
    for label in LABELS:
        pairs = [(p, r) for p, r in zip(prompts, responses) if p["label"] == label]
        flags = [refused(r, label) for _, r in pairs]
        block[f"{label}_refusal"] = sum(flags) / len(flags) if flags else None
        block[f"n_{label}"] = len(flags)
        intervals[f"{label}_refusal"] = ci95(block[f"{label}_refusal"], len(flags))
        if resets is not None:
            reset = [x for p, x in zip(prompts, resets) if p["label"] == label]
            block[f"{label}_reset"] = sum(reset) / len(reset) if reset else None
            intervals[f"{label}_reset"] = ci95(block[f"{label}_reset"], len(reset))
        kinds = [classify_overrefusal(r, p["prompt"]) for p, r in pairs]
        block["classes"][label] = {c: kinds.count(c) / len(kinds) for c in OVERREFUSAL_CLASSES} if kinds else {}
        intervals["classes"][label] = {c: ci95(x, len(kinds)) for c, x in block["classes"][label].items()}
    by_type: dict = {}
    for p, r in zip(prompts, responses):
        t = by_type.setdefault(p["type"] or p["label"], {"label": p["label"], "refused": 0, "n": 0})
        t["refused"] += refused(r, p["label"])
        t["n"] += 1
    block["by_type"] = {
        k: {
            "label": v["label"],
            "refusal": v["refused"] / v["n"],
            "n": v["n"],
            "ci95": ci95(v["refused"] / v["n"], v["n"]),
        }
        for k, v in sorted(by_type.items())
    }
    block["ci95"] = intervals
    return block


def report_markdown(block: dict, model: str, prompts_path: str) -> str:
    lines = [
        f"# Over-refusal: {model}",
        "",
        f"Prompts: `{prompts_path}`. Refusal judged by `derta.eval.refusal.refuses`: "
        "a refusal-word loop counts as refusing a safe prompt, not as refusing an unsafe one.",
        "",
        "Rates in %, with 95 % Wilson intervals in brackets.",
        "",
        "| half | refused | n |",
        "|---|---|---|",
        f"| safe prompts (lower is better) | {with_interval(block['safe_refusal'], block['n_safe'])} | {block['n_safe']} |",
        f"| unsafe prompts (higher is better) | {with_interval(block['unsafe_refusal'], block['n_unsafe'])} "
        f"| {block['n_unsafe']} |",
        *(
            f"| {label} prompts: response reset after [RESET] | {with_interval(block[f'{label}_reset'], block[f'n_{label}'])} "
            f"| {block[f'n_{label}']} |"
            for label in LABELS
            if f"{label}_reset" in block
        ),
        "",
        "XSTest's three classes (string match, `derta.eval.refusal.classify_overrefusal`):",
        "",
        "| half | " + " | ".join(c.replace("_", " ") for c in OVERREFUSAL_CLASSES) + " |",
        "|---|---|---|---|",
    ]
    n = {label: block[f"n_{label}"] for label in LABELS}
    lines += [
        f"| {label} | " + " | ".join(with_interval(shares.get(c), n[label]) for c in OVERREFUSAL_CLASSES) + " |"
        for label, shares in block["classes"].items()
        if shares
    ]
    lines += ["", "| type | label | refused | n |", "|---|---|---|---|"]
    lines += [
        f"| {t} | {v['label']} | {with_interval(v['refusal'], v['n'])} | {v['n']} |"
        for t, v in block["by_type"].items()
    ]
    return "\n".join(lines) + "\n"


def run_overrefusal(
    out: str | os.PathLike,
    prompts_path: str | os.PathLike,
    make_backend: Callable[[], object],
    model_name: str,
    limit: int | None = None,
    progress: bool | None = None,
    settings: dict | None = None,
) -> dict:
    """Generate (resumably), score and write DIR/{generations.jsonl, summary.json, report.md}; returns the summary.

    `make_backend()` gives the model to generate with (called only when a response is missing); `settings` (the
    generation settings: length cap, template, calibration ...) join the run's manifest, so a resume with
    others is refused.
    """
    prompts = load_overrefusal_prompts(prompts_path)[:limit]
    manifest = {
        "model": model_name,
        "n": len(prompts),
        "prompts_sha256": text_sha256([f"{p['label']}\x00{p['type']}\x00{p['prompt']}" for p in prompts]),
        **(settings or {}),
    }
    run = RunDir(out, manifest)
    run.check()

    def score(batch, responses, backend):
        return [
            {"index": i, **prompts[i], "response": r, "refused": refused(r, prompts[i]["label"])}
            for (i, _), r in zip(batch, responses)
        ]

    rows = run_task(
        run,
        [(i, GenInput(p["prompt"])) for i, p in enumerate(prompts)],
        make_backend,
        score,
        desc="over-refusal",
        progress=progress,
    )
    ordered = ordered_rows(run, rows, range(len(prompts)))
    block = score_overrefusal(prompts, [r["response"] for r in ordered], [bool(r.get("reset")) for r in ordered])
    if not any(r["response"].strip() for r in ordered):  # nothing refused, nothing answered: not a score
        block.update(safe_refusal=None, unsafe_refusal=None, not_scored="every response is empty")
    summary = {"model": model_name, "prompts": str(prompts_path), "n": len(prompts), **block}
    write_json(run.dir / "summary.json", summary)
    write_text(run.dir / "report.md", report_markdown(block, model_name, str(prompts_path)))
    return summary
