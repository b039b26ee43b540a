"""Reading what users give: rows from JSONL, JSON arrays, CSV, .txt or a `datasets` name, and the one prompt rule.

Every command reads a prompt from a row the same way (`prompt_of`: the first of PROMPT_FIELDS the row has, after
`data.shapes.normalize_row` has read a known shape such as HarmBench's CSV or chat messages), so the same file gives
the same prompts to `derta eval`, `derta judge`, `derta calibrate` and the rest. Training rows (`load_rows`) go
through the same shapes. A row's line is the line of its file where it starts, for one-line errors about it.
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from derta.data.shapes import columns, guess_columns, missing_field, normalize_row
from derta.hub import go_offline, offline_reason
from derta.io import InputError, check_fields, check_input_file, check_unicode, parse_json, read_jsonl, read_text


def parse_mapping(spec: str | None) -> dict[str, str]:
    """`instruction=prompt,response=chosen` -> {"instruction": "prompt", "response": "chosen"}."""
    if not spec:
        return {}
    mapping = {}
    for part in spec.split(","):
        ours, _, theirs = part.partition("=")
        if not ours.strip() or not theirs.strip():
            raise InputError(f"bad column mapping '{part}': use ours=theirs,...")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def load_rows(
    source: str,
    required: tuple[str, ...],
    mapping: dict[str, str] | None = None,
    kind: str = "row",
    flag: str = "a column mapping",
    with_lines: bool = False,
) -> list:
    """Rows from a file (`read_records`: JSONL, a JSON array, CSV) or a `datasets` name/path (`NAME[:SPLIT]`).

    `mapping` renames source columns to ours (ours=theirs), e.g. instruction=prompt; then a known shape is read
    (`data.shapes.normalize_row`) and a row with no `instruction` takes its prompt field (question, then prompt).
    A row lacking one of `required` is one line naming the fix (`flag`: the command's mapping flag). With
    `with_lines`, (line, row) pairs: the file's own line numbers, or a dataset's row numbers from 1.
    """
    path = Path(source)
    if path.suffix.lower() in (".jsonl", ".json", ".csv", ".txt") or path.exists() and not path.is_dir():
        records = read_records(path)
    else:
        records = list(enumerate(_load_hf(source), 1))
    rows = []
    for lineno, r in records:
        given = _mapped(r, mapping or {}, source, lineno, kind)
        row = normalize_row(given, source, lineno)
        if "instruction" in required and "instruction" not in row:
            name = next((f for f in PROMPT_FIELDS if f in row), None)
            if name is not None:
                check_fields(row, [name], source, lineno, kind)
                row = {**row, "instruction": row[name]}
                del row[name]
        message = missing_field(given, row, required, kind, flag)
        if message:
            raise InputError(message, source, lineno)
        check_fields(row, required, source, lineno, kind)
        rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise InputError("dataset has no rows", source)
    return rows


def _mapped(row: dict, mapping: dict[str, str], source, lineno, kind) -> dict:
    row = dict(row)
    for ours, theirs in mapping.items():
        if theirs not in row:
            raise InputError(
                f"{kind} has no column '{theirs}' (mapped to '{ours}'; it has {columns(row)})", source, lineno
            )
        row[ours] = row.pop(theirs)
    return row


def _load_hf(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    try:
        import datasets

        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
        else:
            if offline_reason():
                go_offline()  # the cache only: a dataset it lacks fails at once, not after a minute of retries
            ds = datasets.load_dataset(name, split=split or "train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
    except Exception as e:  # datasets raises many types; the user needs one line
        if offline_reason():
            raise InputError(
                f"no such file or directory here, and the hub is offline ({offline_reason()})", source
            ) from None
        raise InputError(
            f"cannot load dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}", source
        ) from None
    return [dict(r) for r in ds]


PROMPT_FIELDS = ("question", "instruction", "prompt")  # the first one a row has is its prompt
LABELS = ("safe", "unsafe")  # over-refusal prompts: answer the safe ones, refuse the unsafe ones


def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line, row) pairs of a JSONL file, a .json file holding an array of row objects (or JSON Lines), a CSV file
    with a header row (XSTest's, AdvBench's and HarmBench's format), or a .txt file (a row {"prompt": line} per
    non-empty line). Lines are the file's own, for one-line errors about a row."""
    path = check_input_file(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".csv", ".json"):
        return read_jsonl(path, with_lines=True)
    text = read_text(path).removeprefix("\ufeff")  # Excel and Notepad start UTF-8 files with a byte-order mark
    if suffix == ".txt":
        rows = [(k, {"prompt": line.strip()}) for k, line in enumerate(text.splitlines(), 1) if line.strip()]
    elif suffix == ".csv":
        rows = _read_csv(path, text)
    elif text.lstrip().startswith("["):
        rows = _read_json_array(path, text)
    else:
        return read_jsonl(path, with_lines=True)
    if not rows:
        raise InputError("file has no rows", path)
    return rows


def _read_csv(path: Path, text: str) -> list[tuple[int, dict]]:
    """Rows of a CSV file under its header, each with the line it starts on (a quoted field may span lines)."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header, rows, end = None, [], 0
    try:
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank lines, and the rows of empty cells spreadsheets leave below the data
            if header is None:
                header = [" ".join(f.split()) for f in fields]
                twice = next((n for i, n in enumerate(header) if n and n in header[:i]), None)
                if twice:
                    raise InputError(f"the header names column '{twice}' twice", path, start)
            elif len(fields) != len(header):
                raise InputError(f"row has {len(fields)} fields, the header has {len(header)}", path, start)
            else:
                rows.append((start, dict(zip(header, fields))))
    except csv.Error as e:  # strict: a stray or unclosed quote, which a lenient reader would glue into a field
        raise InputError(f"malformed CSV ({e})", path, end + 1) from None
    return rows


_SPACE = re.compile(r"[ \t\r\n]*")


def _read_json_array(path: Path, text: str) -> list[tuple[int, dict]]:
    """The objects of a JSON array, each with the line it starts on, read item by item (`io.parse_json`: strict),
    so an error names the line of the item it is in."""
    rows, pos = [], text.index("[") + 1

    def line_at(at: int) -> int:
        return text.count("\n", 0, at) + 1

    pos = _SPACE.match(text, pos).end()
    while not text.startswith("]", pos):
        line = line_at(pos)
        item, pos = parse_json(text, path, start=pos, item_line=line)
        if not isinstance(item, dict):
            raise InputError(f"expected an array of JSON objects, got {type(item).__name__}", path, line)
        check_unicode(item, path, line)
        rows.append((line, item))
        pos = _SPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif not text.startswith("]", pos):
            raise InputError("malformed JSON (expected ',' or ']' after an item)", path, line_at(pos))
    if text[pos + 1 :].strip():
        raise InputError("malformed JSON (extra data after the array)", path, line_at(pos + 1))
    return rows


def prompt_of(row: dict, path=None, lineno: int | None = None, required: bool = True) -> str:
    """A row's prompt: its first field of PROMPT_FIELDS, which must be a non-empty string ("" when the row has none
    and `required` is False), after a known shape is read (`data.shapes.normalize_row`). The one rule every
    command reads prompts by."""
    given, row = row, normalize_row(row, path, lineno)
    name = next((f for f in PROMPT_FIELDS if f in row), None)
    if name is None:
        if required:
            guess = guess_columns(given, ["instruction"]).get("instruction")
            fix = f"rename '{guess}' to 'prompt'" if guess else "name its prompt column 'prompt'"
            raise InputError(
                f"row has none of the fields {', '.join(PROMPT_FIELDS)} (it has {columns(given)}): {fix}", path, lineno
            )
        return ""
    if required:
        check_fields(row, [name], path, lineno, "prompt row")
    elif not isinstance(row[name], str):
        raise InputError(f"field '{name}' must be a string", path, lineno)
    return row[name]


def load_prompt_rows(path: str | os.PathLike) -> list[dict]:
    """{"line", "prompt", "category"} per row of a JSONL, CSV or .txt file (`read_records`): the prompt by `prompt_of`,
    the category a known shape gives (HarmBench's SemanticCategory) or the row's own `category` (DoNotAnswer rows
    from `derta data donotanswer`), None when it has none. Per-category rates are computed from it."""
    return [
        {
            "line": lineno,
            "prompt": prompt_of(row, path, lineno),
            "category": _category(normalize_row(row, path, lineno).get("category")),
        }
        for lineno, row in read_records(path)
    ]


def _category(value) -> str | None:
    """A row's category as text: a name, a number, or a list of names joined by commas; anything else is none
    (files read before categories were counted must still load)."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    return value.strip() or None if isinstance(value, str) else None


def load_prompts(path: str | os.PathLike, with_lines: bool = False) -> list:
    """The prompts of a JSONL, CSV or .txt file (`load_prompt_rows`); with `with_lines`, (line, prompt) pairs."""
    return [(r["line"], r["prompt"]) if with_lines else r["prompt"] for r in load_prompt_rows(path)]


def load_overrefusal_prompts(path: str | os.PathLike) -> list[dict]:
    """{"prompt", "label", "type"} rows: XSTest's CSV as published (prompt, type, label), or JSONL with a prompt
    and a `label` (safe | unsafe)."""
    out = []
    for lineno, r in read_records(path):
        if r.get("label") not in LABELS:
            raise InputError("row needs a non-empty string 'prompt' and a 'label' of safe or unsafe", path, lineno)
        out.append({"prompt": prompt_of(r, path, lineno), "label": r["label"], "type": r.get("type") or ""})
    return out


def load_class_prompts(path: str | os.PathLike, label: str) -> list[str]:
    """The prompts of one class: of an over-refusal file (XSTest's CSV, JSONL rows with a `label`) only those
    labelled `label` (safe | unsafe), of any other prompt file all of them."""
    records = read_records(path)
    if not any("label" in r for _, r in records):
        return load_prompts(path)
    prompts = [r["prompt"] for r in load_overrefusal_prompts(path) if r["label"] == label]
    if not prompts:
        raise InputError(f"no prompts labelled {label} in this file", path)
    return prompts
