"""Answers in GSM8K and MMLU responses, as lm-evaluation-harness extracts them, and `derta score`.

    gsm8k   lm-evaluation-harness's filters, in order, before any stop sequence: the first "#### N", then an
            explicit "the answer is N" (text may follow it), then the last number. strict = the first two;
            flexible = all three (the strict answer, else the last number)
    mmlu    the option letter a response commits to, strictly (`mmlu_prediction`)

`score_file` re-scores saved responses, as `derta judge` re-judges safety.
"""

from __future__ import annotations

import os
import re

from derta.data.sources import read_records
from derta.io import InputError, check_fields, write_jsonl

SCORED_TASKS = ("gsm8k", "mmlu")  # the tasks with an answer to extract (`derta score`)


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _clean_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7'; None if not a number."""
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_gold(answer: str) -> str | None:
    m = re.search(r"####\s*(" + _NUMBER + ")", answer)
    return _clean_number(m.group(1)) if m else None


# lm-evaluation-harness's gsm8k task stops generation at these; scoring cuts saved responses there too,
# so a model that goes on to invent the next "Question: ... #### 3" is scored on its own answer.
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")


def truncate_at_stops(response: str, stops=STOP_SEQUENCES) -> str:
    """The response up to the first stop sequence (what a generation with `until=stops` would have returned)."""
    cut = min((i for i in (response.find(s) for s in stops) if i >= 0), default=len(response))
    return response[:cut]


# lm-evaluation-harness's chain-of-thought GSM8K answers "The answer is N."; chat models write it with text after
# the number ("The answer is 18 dollars, because ..."), in bold, or with a colon, and so do we read it.
_ANSWER_IS = re.compile(r"(?i:\bthe\s+(?:final\s+)?answer\s+is)[\s:*]*(" + _NUMBER + ")")


def gsm8k_strict(response: str) -> str | None:
    """The answer a response states, before any stop sequence: the FIRST "#### N" (lm-evaluation-harness's gsm8k
    strict match), else the first "the answer is N" (its chain-of-thought variant's), else None."""
    text = truncate_at_stops(response)
    m = re.search(r"####\s*(" + _NUMBER + ")", text) or _ANSWER_IS.search(text)
    return _clean_number(m.group(1)) if m else None


def gsm8k_flexible(response: str) -> str | None:
    """The stated answer (`gsm8k_strict`), else the LAST number before any stop sequence (lm-evaluation-harness's
    flexible extract): a stated answer wins over numbers in chatter after it."""
    strict = gsm8k_strict(response)
    if strict is not None:
        return strict
    numbers = re.findall(_NUMBER, truncate_at_stops(response))
    return _clean_number(numbers[-1]) if numbers else None


def mmlu_letters(question: str) -> str:
    """The option letters a question offers ("-(A) ..." lines), A-D if none are marked."""
    letters = "".join(dict.fromkeys(re.findall(r"^\s*-?\(([A-Z])\)", question, re.MULTILINE)))
    return letters or "ABCD"


# An explicit answer statement: "the answer is (C)", "Answer: C", "the correct option is C", "correct choice: (B)".
# The letter must be a capital followed by no letter, so "the answer is a bit subtle" names no option.
_STATEMENT = (
    r"(?i:\b(?:answer|option|choice)\s*(?:is|would be|should be|will be|:)\s*:?\s*(?:option\s+|choice\s+)?)"
    r"\(?([{ls}])(?![A-Za-z0-9])"
)


def mmlu_prediction(response: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter, or None when the response does not commit to one. Strict on purpose:

    1. the first explicit statement: "answer is (C)", "Answer: C", "the correct option is (C)";
    2. a response that is only a letter, or opens with one marked as an option: "B", "(B) ...", "B. ...", "B) ...";
       an opening article ("A good question ...") is not an option;
    3. a parenthesized letter "(C)" when the response names exactly one such letter.
    Bare letters in prose ("I think B is plausible but ... D") are never guessed at: None.
    The response is first cut at stop sequences ("Question:"), as in lm-evaluation-harness.
    """
    text = truncate_at_stops(response)
    ls = "".join(re.escape(c) for c in letters)
    m = re.search(_STATEMENT.format(ls=ls), text)
    if m:
        return m.group(1)
    m = re.match(rf"\s*(?:\(([{ls}])\)|([{ls}])(?:[.):]|\s*$))", text)
    if m:
        return m.group(1) or m.group(2)
    marked = set(re.findall(rf"\(([{ls}])\)", text))
    return marked.pop() if len(marked) == 1 else None


GOLD_FIELDS = ("gold", "answer")


def score_file(task: str, in_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """`derta score`: re-score saved responses, as `derta judge` re-judges safety.

    Rows: {"response"} plus, optionally, the gold answer ("gold" or "answer": for gsm8k a number or a
    solution ending in "#### N", for mmlu a letter) and, for mmlu, the "question" (its option letters;
    A-D without it). Each row is written back with "extracted" (and for gsm8k "extracted_flexible"),
    and "correct" (/"correct_flexible") when it has a gold answer. Every row is checked before anything
    is written; a bad row is an InputError naming its line. Returns counts and accuracies.
    """
    if task not in SCORED_TASKS:
        raise InputError(f"unknown task '{task}' for scoring: use {' or '.join(SCORED_TASKS)}")
    rows = read_records(in_path)
    for lineno, row in rows:
        check_fields(row, ["response"], in_path, lineno)
    scored = [_extract(task, row, _gold(task, row, in_path, lineno)) for lineno, row in rows]
    write_jsonl(out_path, scored)
    graded = [r for r in scored if "correct" in r]
    result = {
        "task": task,
        "n": len(scored),
        "n_gold": len(graded),
        "extracted": sum(r["extracted"] is not None for r in scored),
        "accuracy": round(sum(r["correct"] for r in graded) / len(graded), 4) if graded else None,
    }
    if task == "gsm8k":
        result["accuracy_flexible"] = (
            round(sum(r["correct_flexible"] for r in graded) / len(graded), 4) if graded else None
        )
    return result


def _letters(row: dict) -> str:
    return mmlu_letters(row["question"]) if isinstance(row.get("question"), str) else "ABCD"


def _gold(task: str, row: dict, path, lineno: int) -> str | None:
    """A saved row's gold answer (None when it has none); one line naming the row when it is malformed."""
    if "question" in row and not isinstance(row["question"], str):
        raise InputError("field 'question' must be a string", path, lineno)
    field = next((f for f in GOLD_FIELDS if f in row), None)
    if field is None:
        return None
    value = row[field]
    if task == "mmlu":
        letters = _letters(row)
        if not isinstance(value, str) or value.strip().upper() not in letters or len(value.strip()) != 1:
            raise InputError(
                f"'{field}' must be one option letter among {letters}, got {_short_repr(value)}", path, lineno
            )
        return value.strip().upper()
    number = isinstance(value, (int, float, str)) and not isinstance(value, bool)
    gold = _clean_number(str(value).strip()) if number else None
    if gold is None and isinstance(value, str):
        gold = gsm8k_gold(value)
    if gold is None:
        raise InputError(f"'{field}' must be a number or end in '#### NUMBER', got {_short_repr(value)}", path, lineno)
    return gold


def _extract(task: str, row: dict, gold: str | None) -> dict:
    """The row with its extracted answer(s), and whether they are right when there is a gold answer."""
    out = dict(row)
    if task == "gsm8k":
        out["extracted"], out["extracted_flexible"] = gsm8k_strict(row["response"]), gsm8k_flexible(row["response"])
        if gold is not None:
            out["correct"] = out["extracted"] == gold
            out["correct_flexible"] = out["extracted_flexible"] == gold
        return out
    out["extracted"] = mmlu_prediction(row["response"], _letters(row))
    if gold is not None:
        out["correct"] = out["extracted"] == gold
    return out


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
