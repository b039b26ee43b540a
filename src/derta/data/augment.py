"""What `data build` does to its inputs before a recipe sees them: evaluation prompts out, rephrasings in.

1. Training prompts (safety triples' and helpful rows' instructions) that match an evaluation prompt are
   dropped (`data.exclude`: exact after normalisation, or near-duplicates).
2. A share of the remaining safety triples get one rephrased copy each (`data.rephrase`), after all the triples.
3. A copy whose rephrased prompt matches an evaluation prompt is dropped too: a rephrasing must not bring an
   evaluation prompt back in.

`build_rows` then builds from the result as from any input. Without evaluation prompts and rephrase kinds the
inputs come back as they were, so a build without `--exclude` and `--rephrase` is unchanged.
"""

from __future__ import annotations

from derta.data.exclude import EXCLUDE_RULE, NEAR_DUPLICATE_JACCARD, EvalPrompt, drop_overlap
from derta.data.recipes import RecipeConfig
from derta.data.rephrase import REPHRASE_SHARE, parse_kinds, rephrase_plan, rephrased
from derta.io import InputError


def augment(
    safety: list[dict],
    helpful: list[dict],
    evals: list[EvalPrompt] = (),
    rephrase: str | tuple[str, ...] = (),
    rephrase_share: float = REPHRASE_SHARE,
    seed: int = RecipeConfig.seed,
    safety_lines: list[int] | None = None,
    helpful_lines: list[int] | None = None,
) -> tuple[list[dict], list[dict], dict]:
    """(safety triples + kept rephrased copies, helpful rows, report): the inputs `build_rows` should get.

    `evals`: `exclude.load_eval_prompts(files)`, or EvalPrompt(name, line, prompt) built in memory. `rephrase`:
    kinds (`past,indirect` or a tuple); `seed` is the build's. `*_lines` number the rows in their files (default
    1, 2, ...), for the report, which names lines and evaluation files but holds no prompt text.
    """
    kinds = parse_kinds(rephrase)
    safety_lines = safety_lines if safety_lines is not None else list(range(1, len(safety) + 1))
    safety, dropped_safety = drop_overlap(safety, evals, safety_lines)
    helpful, dropped_helpful = drop_overlap(helpful, evals, helpful_lines)
    if (dropped_safety or dropped_helpful) and not (safety or helpful):
        raise InputError("every training prompt matches an evaluation prompt (--exclude): nothing left to build")
    gone = {d["line"] for d in dropped_safety}
    kept_lines = [line for line in safety_lines if line not in gone]
    plan = rephrase_plan(len(safety), kinds, rephrase_share, seed)
    copies, dropped_copies = drop_overlap(
        [rephrased(safety[i], k) for i, k in plan], evals, [kept_lines[i] for i, _ in plan]
    )
    kind_of = {kept_lines[i]: k for i, k in plan}
    for d in dropped_copies:
        d["rephrase"] = kind_of[d["line"]]  # "line" is the line of the triple it rephrased
    dropped = {"safety": dropped_safety, "helpful": dropped_helpful, "rephrased": dropped_copies}
    report = {
        "rule": EXCLUDE_RULE,
        "near_duplicate_jaccard": NEAR_DUPLICATE_JACCARD,
        "files": _per_file(evals, dropped),
        "rephrase": {
            "kinds": list(kinds),
            "share": rephrase_share,
            "seed": seed,
            "triples": len(safety),
            "copies": {k: sum(c["rephrase"] == k for c in copies) for k in kinds},
        },
        "dropped": dropped,
    }
    return safety + copies, helpful, report


def _per_file(evals: list[EvalPrompt], dropped: dict[str, list[dict]]) -> dict[str, dict[str, int]]:
    """Per evaluation file: its prompts, and how many dropped training prompts of each source matched it."""
    files = {e.file: {"prompts": 0, **dict.fromkeys(dropped, 0)} for e in evals}
    for e in evals:
        files[e.file]["prompts"] += 1
    for source, entries in dropped.items():
        for d in entries:
            for m in d["matches"]:
                files[m["file"]][source] += 1
    return files


def describe(report: dict) -> list[str]:
    """What `augment` did, in the lines `data build` prints before its `wrote N rows` line."""
    out = []
    dropped = report["dropped"]
    if report["files"]:
        n = len(dropped["safety"]) + len(dropped["helpful"])
        per_file = "; ".join(
            f"{f}: {c['safety']} safety, {c['helpful']} helpful"
            + (f", {c['rephrased']} rephrased" if report["rephrase"]["kinds"] else "")
            for f, c in report["files"].items()
        )
        out.append(f"excluded {n} training prompts that match an evaluation prompt ({per_file})")
    r = report["rephrase"]
    if r["kinds"]:
        kinds = ", ".join(f"{k} {n}" for k, n in r["copies"].items())
        lost = len(dropped["rephrased"])
        more = f"; {lost} more rephrased, then dropped for matching an evaluation prompt" if lost else ""
        out.append(f"rephrased {sum(r['copies'].values())} of {r['triples']} safety triples ({kinds}){more}")
    return out
