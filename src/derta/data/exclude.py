"""Evaluation prompts are never training data: find and drop training prompts that match one.

Two prompts match when they are

    exact   equal after normalisation: Unicode NFKC, case folded, every run of punctuation, symbols and
            whitespace one space ("How can I  open the GATE?!" = "how can i open the gate");
    near    near-duplicates: the sets of their normalised words have a Jaccard similarity (shared words /
            all words) of at least NEAR_DUPLICATE_JACCARD.

At 0.8, one word changed in a prompt of n distinct words ((n-1)/(n+1)) is caught from n = 9 words on, even when
that word is what the request is about: "What is the best way to beat a classmate?" and "... to scam a
classmate?" match, so templated sets held out by combination (the demo's synthetic splits) overlap this way.
Shorter prompts must match exactly. Word order is ignored: a reordered prompt is the same request.

Matching is a set-similarity join with prefix filtering (Chaudhuri et al., 2006; Bayardo et al., 2007): with
each word set sorted in one global order, rarest word first, two sets whose Jaccard is at least t share a word
among the first |s| - ceil(t|s|) + 1 words of each. Only those prefixes are indexed and probed, so a training
prompt is compared with the few evaluation prompts that share a rare word with it, not with all of them.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from collections import Counter, defaultdict
from typing import NamedTuple

from derta.data.sources import load_prompts

NEAR_DUPLICATE_JACCARD = 0.8
EXCLUDE_RULE = (
    "exact: equal after NFKC, case folding and collapsing punctuation and whitespace; "
    f"near: word-set Jaccard similarity >= {NEAR_DUPLICATE_JACCARD}"
)
_SEPARATORS = re.compile(r"[\W_]+")


class EvalPrompt(NamedTuple):
    """An evaluation prompt and where it came from (reports name the file and line, never the text)."""

    file: str
    line: int
    prompt: str


def load_eval_prompts(paths: list[str | os.PathLike]) -> list[EvalPrompt]:
    """Every prompt of each file (JSONL, CSV such as XSTest's, or .txt: what `data.sources.load_prompts` reads)."""
    files = dict.fromkeys(str(p) for p in paths)  # a file named twice is one evaluation set
    return [EvalPrompt(f, line, prompt) for f in files for line, prompt in load_prompts(f, with_lines=True)]


def normalise(text: str) -> str:
    return " ".join(_SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


def _prefix_length(size: int, threshold: float) -> int:
    # The small tolerance keeps float error (0.8 * 15 = 12.000000000000002) from shortening the prefix.
    return size - math.ceil(threshold * size - 1e-9) + 1


def overlap(
    train_prompts: list[str], eval_prompts: list[str], threshold: float = NEAR_DUPLICATE_JACCARD
) -> list[tuple[int, int, str]]:
    """Every (train index, eval index, "exact" | "near") pair of matching prompts, in index order."""
    evals = [normalise(p) for p in eval_prompts]
    exact = defaultdict(list)
    for j, text in enumerate(evals):
        if text:  # a prompt of punctuation alone has no words to match by
            exact[text].append(j)
    sets = [frozenset(text.split()) for text in evals]
    frequency = Counter(w for s in sets for w in s)

    def prefix(words: frozenset) -> list[str]:
        return sorted(words, key=lambda w: (frequency[w], w))[: _prefix_length(len(words), threshold)]

    index = defaultdict(list)
    for j, s in enumerate(sets):
        for w in prefix(s):
            index[w].append(j)
    pairs = []
    for i, prompt in enumerate(train_prompts):
        text = normalise(prompt)
        if not text:
            continue
        found = dict.fromkeys(exact.get(text, ()), "exact")
        words = frozenset(text.split())
        for j in sorted({j for w in prefix(words) for j in index.get(w, ())} - found.keys()):
            shared = len(words & sets[j])
            if shared >= threshold * (len(words) + len(sets[j]) - shared) - 1e-9:
                found[j] = "near"
        pairs.extend((i, j, found[j]) for j in sorted(found))
    return pairs


def drop_overlap(
    rows: list[dict], evals: list[EvalPrompt], lines: list[int] | None = None, field: str = "instruction"
) -> tuple[list[dict], list[dict]]:
    """(kept rows, dropped): the rows whose `field` matches no evaluation prompt, and for each dropped row
    {"line", "kind", "matches": [{"file", "line", "kind"}, one per evaluation file, an exact match first]}.

    `lines` are the rows' line numbers in their file (default: 1, 2, ...); the report holds no prompt text.
    """
    lines = lines if lines is not None else list(range(1, len(rows) + 1))
    best: dict[int, dict[str, tuple[str, int]]] = defaultdict(dict)
    for i, j, kind in overlap([r[field] for r in rows], [e.prompt for e in evals]):
        e = evals[j]
        held = best[i].get(e.file)
        if held is None or (kind == "exact" and held[0] == "near"):
            best[i][e.file] = (kind, e.line)
    dropped = []
    for i in sorted(best):
        matches = [{"file": f, "line": line, "kind": kind} for f, (kind, line) in best[i].items()]
        overall = "exact" if any(m["kind"] == "exact" for m in matches) else "near"
        dropped.append({"line": lines[i], "kind": overall, "matches": matches})
    return [r for i, r in enumerate(rows) if i not in best], dropped
