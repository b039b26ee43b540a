"""Reading what users give: training rows (JSONL or a `datasets` name) and prompts (JSONL, CSV or .txt).

Every command reads a prompt from a row the same way (`prompt_of`: the first of PROMPT_FIELDS the row has),
so the same file gives the same prompts to `derta eval`, `derta judge`, `derta calibrate` and the rest.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from derta.io import InputError, check_fields, read_jsonl, read_text


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
    with_lines: bool = False,
) -> list:
    """Rows from a JSONL file, or from a `datasets` name/path (`NAME` or `NAME:SPLIT`).

    `mapping` renames source columns to ours (ours=theirs), e.g. instruction=prompt. With `with_lines`,
    (line, row) pairs: the file's own line numbers, or a dataset's row numbers from 1.
    """
    mapping = mapping or {}
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        records = read_jsonl(path, kind=kind, with_lines=True)
    else:
        records = [(i, r) for i, r in enumerate(_load_hf(source), 1)]
    rows = []
    for lineno, r in records:
        row = dict(r)
        for ours, theirs in mapping.items():
            if theirs not in row:
                raise InputError(f"{kind} has no column '{theirs}' (mapped to '{ours}')", source, lineno)
            row[ours] = row.pop(theirs)
        check_fields(row, required, source, lineno, kind)
        rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise InputError("dataset has no rows", source)
    return rows


def _load_hf(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    try:
        import datasets

        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split or "train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
    except Exception as e:  # datasets raises many types; the user needs one line
        raise InputError(
            f"cannot load dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}", source
        ) from None
    return [dict(r) for r in ds]


PROMPT_FIELDS = ("question", "instruction", "prompt")  # the first one a row has is its prompt
LABELS = ("safe", "unsafe")  # over-refusal prompts: answer the safe ones, refuse the unsafe ones


def read_records(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line, row) pairs of a JSONL file, a CSV file with a header row (XSTest's format), or a .txt file (a row
    {"prompt": line} per non-empty line). Lines are the file's own, for one-line errors about a row."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    if path.suffix == ".txt":
        rows = [(k, {"prompt": line.strip()}) for k, line in enumerate(read_text(path).splitlines(), 1) if line.strip()]
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        rows, end = [], 1
        for row in reader:  # a quoted field may span lines: a row starts after the previous one ended
            rows.append((end + 1, row))
            end = reader.line_num
    else:
        return read_jsonl(path, with_lines=True)
    if not rows:
        raise InputError("file is empty", path)
    return rows


def prompt_of(row: dict, path=None, lineno: int | None = None, required: bool = True) -> str:
    """A row's prompt: its first field of PROMPT_FIELDS, which must be a non-empty string ("" when the row has none
    and `required` is False). The one rule every command reads prompts by."""
    name = next((f for f in PROMPT_FIELDS if f in row), None)
    if name is None:
        if required:
            raise InputError(f"row has none of the fields {', '.join(PROMPT_FIELDS)}", path, lineno)
        return ""
    if required:
        check_fields(row, [name], path, lineno, "prompt row")
    elif not isinstance(row[name], str):
        raise InputError(f"field '{name}' must be a string", path, lineno)
    return row[name]


def load_prompts(path: str | os.PathLike, with_lines: bool = False) -> list:
    """The prompts of a JSONL, CSV or .txt file (`read_records`), one per row (`prompt_of`); with `with_lines`,
    (line, prompt) pairs."""
    return [
        (lineno, prompt_of(row, path, lineno)) if with_lines else prompt_of(row, path, lineno)
        for lineno, row in read_records(path)
    ]


def load_overrefusal_prompts(path: str | os.PathLike) -> list[dict]:
    """{"prompt", "label", "type"} rows: XSTest's CSV as published (prompt, type, label), or JSONL with a prompt
    and a `label` (safe | unsafe)."""
    out = []
    for lineno, r in read_records(path):
        if r.get("label") not in LABELS:
            raise InputError("row needs a non-empty string 'prompt' and a 'label' of safe or unsafe", path, lineno)
        out.append({"prompt": prompt_of(r, path, lineno), "label": r["label"], "type": r.get("type") or ""})
    return out
