"""Reading user input strictly and writing outputs atomically.

Every user-facing input error is an `InputError`: the CLI prints its one-line message
(`FILE:LINE: what is wrong`) and exits 2, with no traceback and nothing half-written.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any


class InputError(Exception):
    """Bad user input; str(self) is the one line the user sees."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


def read_jsonl(
    path: str | os.PathLike, required: Iterable[str] = (), kind: str = "row", with_lines: bool = False
) -> list:
    """Rows of a JSONL file; each must be an object whose `required` fields are non-empty strings.

    With `with_lines`, (line number, row) pairs, for messages about a row found bad later.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("not UTF-8 text", path, lineno) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"malformed JSON ({e.msg} at column {e.colno})", path, lineno) from None
            if not isinstance(row, dict):
                raise InputError(f"expected a JSON object per line, got {type(row).__name__}", path, lineno)
            check_unicode(row, path, lineno)
            check_fields(row, required, path, lineno, kind)
            rows.append((lineno, row) if with_lines else row)
    if not rows:
        raise InputError("file is empty", path)
    return rows


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def check_unicode(value, path=None, lineno=None) -> None:
    """JSON's \\ud800-style escapes can hold half a surrogate pair, which no file or tokenizer can take."""
    for text in _strings(value):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InputError(
                f"string holds a lone surrogate ({text[e.start]!r}): not valid Unicode text", path, lineno
            ) from None


# ---------------------------------------------------------------- numeric settings

# One rule per kind of number; every numeric flag of every command names its rule (NUMERIC_RULES),
# and train's YAML settings use the same rules, so a bad value is always one line naming the flag.
RULES = {
    "count": (lambda v: v >= 1, "must be at least 1"),
    "count0": (lambda v: v >= 0, "must be 0 or more"),
    "seed": (lambda v: 0 <= v < 2**32, "must be in [0, 2**32)"),
    "positive": (lambda v: v > 0, "must be a positive number"),
    "nonneg": (lambda v: v >= 0, "must be a finite number >= 0"),
    "ratio": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
    "fraction": (lambda v: 0 <= v <= 1, "must be between 0 and 1"),
    "open_fraction": (lambda v: 0 < v < 1, "must be in (0, 1)"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "points": (lambda v: v >= 5, "must be at least 5"),
}

# The range rule (RULES) of every numeric flag of every command, by its argparse dest; derta train's YAML
# settings use the same entries (train.check_ranges); a test checks that no int or float flag
# of any command is missing here, so a new flag gets its range checked too.
NUMERIC_RULES = {
    "seed": "seed",
    "vocab_size": "count",
    "hidden_size": "count",
    "layers": "count",
    "no_prefix_ratio": "fraction",
    "rto_keep_ratio": "ratio",
    "rto_weight": "nonneg",
    "max_rto_share": "open_fraction",
    "rephrase_share": "fraction",
    "max_new_tokens": "count",
    "batch_size": "count",
    "limit": "count",
    "epochs": "positive",
    "max_steps": "count",
    "learning_rate": "positive",
    "grad_accum": "count",
    "max_length": "count",
    "save_steps": "count",
    "logging_steps": "count",
    "lora_r": "count",
    "lora_alpha": "count",
    "lora_dropout": "dropout",
    "lora_layers": "count",
    "points": "points",
    "steps": "count",
    "anchors": "count0",
    "eval_limit": "count",
    "pair_iterations": "count",
    "autodan_population": "count",
    "autodan_generations": "count",
    "pair_streams": "count",
    "tensor_parallel_size": "count",
    "constraint_beta": "nonneg",
    "dpo_beta": "nonneg",
    "dpo_sft_weight": "nonneg",
    "vocab": "count",
    "batch": "count",
    "seq": "count",
    "pack_batches": "count",
    "repeats": "count",
    "prompts": "count",
    "gen_batch": "count",
    "probe_pairs": "count",
    "max_over_refusal": "fraction",
    "target_refusal": "fraction",
    "tries": "count",
    "temperature": "positive",
    "top_p": "ratio",
    "test_share": "open_fraction",
}


def check_number(value, flag: str, rule: str, source=None, line: int | None = None) -> None:
    """An InputError naming `flag` unless `value` is a finite number obeying `rule` (see RULES)."""
    if value is None:
        return
    ok, what = RULES[rule]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise InputError(f"{flag} {what}, not {value}", source, line)


def check_writable(path: str | os.PathLike, flag: str, directory: bool = False) -> None:
    """Fail before any work when `path` cannot be written: a parent that is a file, a read-only directory."""
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise InputError(f"{flag}: exists and is not a directory", path)
    if not directory and path.is_dir():
        raise InputError(f"{flag}: is a directory, expected a file path", path)
    probe = path if directory and path.is_dir() else path.parent
    while not probe.exists():
        if probe.is_symlink() or probe == probe.parent:
            raise InputError(f"{flag}: cannot create {probe}", path)
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"{flag}: {probe} is a file, so nothing can be written under it", path)
    try:  # a real write, not os.access: root passes access checks on read-only mounts too
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise InputError(f"{flag}: cannot write in {probe} ({e.strerror or type(e).__name__})", path) from None


def read_text(path: str | os.PathLike, kind: str = "file") -> str:
    """A whole UTF-8 text file, or an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"no such {kind}", path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{kind} is not UTF-8 text", path) from None


def check_fields(row: dict, required: Iterable[str], path, lineno, kind: str = "row") -> None:
    for field in required:
        if field not in row:
            raise InputError(f"{kind} is missing field '{field}'", path, lineno)
        if not isinstance(row[field], str):
            raise InputError(f"field '{field}' must be a string, got {type(row[field]).__name__}", path, lineno)
        if not row[field].strip():
            raise InputError(f"field '{field}' is empty", path, lineno)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Write to a temp file beside `path` and rename it into place only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_open(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def pyplot():
    """matplotlib.pyplot on the Agg backend: plots are files, no display is needed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_png(path: str | os.PathLike, fig) -> None:
    """Save a matplotlib figure as PNG (atomically) and free it."""
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    pyplot().close(fig)


def pct(x: float | None, missing: str = "n/a") -> str:
    """A share as a percentage with one decimal, for report tables ("12.5"); `missing` for None."""
    return missing if x is None else f"{100 * x:.1f}"
