"""The shapes of common safety and chat data, read without a column mapping.

`normalize_row` turns a raw row into derta's fields: `instruction` (the prompt), `response` (a helpful answer),
`harmful_response` and `safe_response` (a safety triple's two answers), `category`. A row of a known shape gets
what its columns hold; every other row passes through unchanged. `missing_field` explains a row that lacks what a
command needs, with the column mapping or the command that would fix it.

    PKU-SafeRLHF   prompt, response_0, response_1, is_response_0_safe, is_response_1_safe
                   -> instruction; a triple when exactly one response is safe
    BeaverTails    prompt, response, is_safe (category: {name: flagged})
                   -> instruction, harmful_response or safe_response, category (the flagged names)
    HarmBench      Behavior, BehaviorID (ContextString, SemanticCategory, ...)
                   -> instruction (the context first, as HarmBench writes it), category
    AdvBench       goal, target               -> instruction
    chat           messages [{role, content}] -> instruction (the last user message before the final assistant
                                                 message, or the last one), response (that assistant message)
    Alpaca         instruction, input (output) -> instruction (a non-empty input after a blank line), response

The reference repository's training rows (prefix, text, safe) are training rows, not data: `derta train` reads
them (`data.tokenize.load_training_rows`), and every reader here says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from derta.io import InputError, check_fields

TRIPLES = "turn the prompts into triples with `derta data triples`"


@dataclass(frozen=True)
class Shape:
    name: str
    keys: tuple[str, ...]  # the columns that identify it, all present
    consumes: tuple[str, ...]  # the columns its derta fields replace
    convert: Callable[[dict, object, int | None], dict]  # (row, path, line) -> derta's fields
    holds: str  # what its rows give, for messages
    safety_fix: str  # how to get triples from such rows ({flag}: the command's column-mapping flag)
    helpful_fix: str  # how to get helpful rows from them


def _string(row: dict, key: str, path, lineno) -> str:
    """A text column that may be empty or missing (Alpaca's input, HarmBench's context; `datasets` reads an empty
    CSV cell as None)."""
    value = row.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(f"field '{key}' must be a string, got {type(value).__name__}", path, lineno)
    return value


def _flag(row: dict, key: str, path, lineno) -> bool:
    """A true/false column: JSON booleans, or the words True/False that CSV exports write."""
    value = row[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise InputError(f"field '{key}' must be true or false, got {str(value)[:40]!r}", path, lineno)


def _pku(row: dict, path, lineno) -> dict:
    check_fields(row, ("prompt", "response_0", "response_1"), path, lineno, "PKU-SafeRLHF row")
    safe = [_flag(row, f"is_response_{i}_safe", path, lineno) for i in (0, 1)]
    out = {"instruction": row["prompt"]}
    if safe[0] != safe[1]:  # two safe (or two unsafe) answers make no triple
        out["safe_response"] = row[f"response_{safe.index(True)}"]
        out["harmful_response"] = row[f"response_{safe.index(False)}"]
    return out


def _beavertails(row: dict, path, lineno) -> dict:
    check_fields(row, ("prompt", "response"), path, lineno, "BeaverTails row")
    safe = _flag(row, "is_safe", path, lineno)
    out = {"instruction": row["prompt"], "safe_response" if safe else "harmful_response": row["response"]}
    flagged = row.get("category")
    if isinstance(flagged, dict) and any(v is True for v in flagged.values()):
        out["category"] = ",".join(k for k, v in flagged.items() if v is True)
    elif isinstance(flagged, str) and flagged.strip():
        out["category"] = flagged
    return out


def _harmbench(row: dict, path, lineno) -> dict:
    check_fields(row, ("Behavior",), path, lineno, "HarmBench row")
    context = _string(row, "ContextString", path, lineno).strip()
    # HarmBench's own test cases put a contextual behaviour's context first, then a rule, then the request.
    out = {"instruction": f"{context}\n\n---\n\n{row['Behavior']}" if context else row["Behavior"]}
    if _string(row, "SemanticCategory", path, lineno).strip():
        out["category"] = row["SemanticCategory"]
    return out


def _advbench(row: dict, path, lineno) -> dict:
    check_fields(row, ("goal",), path, lineno, "AdvBench row")
    return {"instruction": row["goal"]}


def _chat(row: dict, path, lineno) -> dict:
    messages = row["messages"]
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise InputError("field 'messages' must be a list of {role, content} objects with string content", path, lineno)
    out, end = {}, len(messages)
    if messages and messages[-1]["role"] == "assistant":
        out["response"], end = messages[-1]["content"], end - 1
    # derta trains and evaluates single turns: earlier turns and the system message are not part of the prompt.
    user = next((m["content"] for m in reversed(messages[:end]) if m["role"] == "user"), None)
    if user is None:
        raise InputError("chat row has no user message before its last assistant message", path, lineno)
    out["instruction"] = user
    return out


def _alpaca(row: dict, path, lineno) -> dict:
    check_fields(row, ("instruction",), path, lineno, "Alpaca row")
    extra = _string(row, "input", path, lineno).strip()
    # Alpaca's input is part of the task (the text to summarise, the list to sort): dropping it changes the prompt.
    out = {"instruction": f"{row['instruction'].rstrip()}\n\n{extra}" if extra else row["instruction"]}
    if "output" in row:
        out["response"] = _string(row, "output", path, lineno)
    return out


def _reference(row: dict, path, lineno) -> dict:
    raise InputError(
        "a training row in the reference repository's format (prefix, text, safe): give the file to "
        "`derta train --data` as it is",
        path,
        lineno,
    )


ONE_RESPONSE = "give harmful_response/safe_response with {flag}, or " + TRIPLES
HARMFUL_PROMPTS = "they are harmful prompts: give them to `derta eval --prompts`, or " + TRIPLES
# The first shape whose keys a row has is its shape: PKU-SafeRLHF before BeaverTails (both have a prompt).
SHAPES = (
    # (its convert refuses every row, so it needs no fixes)
    Shape("reference-format", ("prefix", "text", "safe"), (), _reference, "training rows", "", ""),
    Shape(
        "PKU-SafeRLHF",
        ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"),
        ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"),
        _pku,
        "two responses each, safe or not",
        "a triple needs one safe and one unsafe response: keep only such rows, or map the columns with {flag}",
        "give them to --safety, or map a safe response column with {flag} response=COLUMN",
    ),
    Shape(
        "BeaverTails",
        ("prompt", "response", "is_safe"),
        ("prompt", "response", "is_safe", "category"),
        _beavertails,
        "one response each",
        ONE_RESPONSE,
        "they are safety data, safe or not: " + TRIPLES + " and give those to --safety",
    ),
    Shape(
        "HarmBench",
        ("Behavior", "BehaviorID"),
        ("Behavior", "ContextString", "SemanticCategory"),
        _harmbench,
        "prompts only",
        TRIPLES,
        HARMFUL_PROMPTS,
    ),
    Shape(
        "AdvBench",
        ("goal", "target"),
        ("goal",),
        _advbench,
        "prompts only",
        TRIPLES,
        HARMFUL_PROMPTS,
    ),
    Shape(
        "chat",
        ("messages",),
        ("messages",),
        _chat,
        "one conversation each",
        ONE_RESPONSE,
        "end each conversation with the assistant's answer",
    ),
    Shape(
        "Alpaca",
        ("instruction", "input"),
        ("instruction", "input", "output"),
        _alpaca,
        "one response each",
        ONE_RESPONSE,
        "give each row an 'output', or map a response column with {flag} response=COLUMN",
    ),
)


def shape_of(row: dict) -> Shape | None:
    """The known shape a row has (None: a plain row)."""
    return next((s for s in SHAPES if all(k in row for k in s.keys)), None)


def normalize_row(row: dict, path=None, lineno: int | None = None) -> dict:
    """`row` in derta's fields: a known shape's columns replaced by what they hold (the row's other columns
    kept), a plain row as it is. The one place a row's shape is read."""
    shape = shape_of(row)
    if shape is None:
        return row
    derived = shape.convert(row, path, lineno)
    return {**{k: v for k, v in row.items() if k not in shape.consumes}, **derived}


# Columns that usually hold each of derta's fields, for suggesting a mapping (compared in lower case).
GUESSES = {
    "instruction": ("query", "question", "prompt", "input", "goal", "behavior", "request", "user", "human"),
    "response": ("answer", "output", "completion", "response", "reply", "assistant"),
    "harmful_response": ("rejected", "harmful", "unsafe_response", "harmful_answer", "unsafe"),
    "safe_response": ("chosen", "safe", "refusal", "safe_answer"),
}


def guess_columns(row: dict, fields) -> dict[str, str]:
    """{our field: their column} for the fields a text column of `row` probably holds, each column used once."""
    by_name = {str(k).lower(): k for k, v in row.items() if isinstance(v, str)}
    out: dict[str, str] = {}
    for field in fields:
        theirs = next((by_name[g] for g in GUESSES.get(field, ()) if by_name.get(g) not in (None, *out.values())), None)
        if theirs is not None:
            out[field] = theirs
    return out


def columns(row: dict, most: int = 8) -> str:
    """A row's column names for a one-line message."""
    names = [" ".join(str(k).split())[:40] for k in row]
    if not names:
        return "no fields"
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")


def missing_field(given: dict, row: dict, required, kind: str, flag: str) -> str | None:
    """What to tell the user when `row` (normalised from `given`, the columns as read and mapped) lacks one of
    `required`: the shape's own fix, or the mapping that probably fixes it (`flag`: the mapping's flag). None when
    nothing is missing."""
    missing = [f for f in required if f not in row]
    if not missing:
        return None
    head = f"{kind} is missing field '{missing[0]}'"
    shape = shape_of(given)
    if shape is not None:
        fix = shape.safety_fix if {"harmful_response", "safe_response"} & set(required) else shape.helpful_fix
        return f"{head} ({shape.name} rows hold {shape.holds}): {fix.format(flag=flag)}"
    guess = guess_columns(given, missing)
    mapping = ",".join(f"{f}={guess.get(f, 'COLUMN')}" for f in missing)
    return f"{head} (it has {columns(given)}): map them with {flag} {mapping}"
