"""Reading user input strictly and writing outputs atomically.

Every user-facing input error is an `InputError`: the CLI prints its one-line message
(`FILE:LINE: what is wrong`) and exits 2, with no traceback and nothing half-written.

JSON from users is read strictly (`parse_json`): a duplicate key, an integer beyond 64 bits, a number that
overflows to infinity or nesting deeper than MAX_DEPTH is refused rather than silently kept. Outputs go through
`atomic_open`: written beside the target, renamed into place, with the mode a plain `open` would give.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
import tempfile
import threading
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


def show_progress(progress: bool | None = None) -> bool:
    """Whether to draw a progress bar: on a terminal only (piped into a log, a bar's redraws are noise), and never
    when `progress` is False."""
    return progress is not False and sys.stderr.isatty()


@contextmanager
def processing(what: str | os.PathLike) -> Iterator[None]:
    """Marks an unexpected error raised inside with the input being processed, for the CLI's one line about it."""
    try:
        yield
    except InputError:
        raise
    except Exception as e:
        if getattr(e, "derta_input", None) is None:
            with suppress(AttributeError, TypeError):  # some exception types take no attributes
                e.derta_input = str(what)
        raise


def check_input_file(path: str | os.PathLike, kind: str = "file") -> Path:
    """`path` as a regular file, or an InputError saying what it is instead.

    A directory, a named pipe or a device is refused before it is opened: opening a pipe nobody writes to
    would wait forever, and derta reads some inputs twice (checked first, then used).
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"no such {kind}", path) from None
    except OSError as e:
        raise InputError(f"cannot read this {kind} ({e.strerror or type(e).__name__})", path) from None
    if stat.S_ISDIR(mode):
        raise InputError(f"is a directory, not a {kind}", path)
    if not stat.S_ISREG(mode):
        what = "a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise InputError(f"is {what}, not a regular {kind}: save the data to a file and give that", path)
    return path


# ---------------------------------------------------------------- strict JSON

MAX_DEPTH = 64  # rows are flat; deeper nesting is a broken or hostile file (and would exhaust the stack)
INT64 = 2**63  # token ids, counts and indices all fit; a longer integer is a broken file, not a value


class _Refused(ValueError):
    """A JSON value derta does not take (raised from inside the parser's hooks)."""


def _no_duplicates(pairs: list) -> dict:
    row = {}
    for key, value in pairs:
        if key in row:
            raise _Refused(f"duplicate key '{key}' (JSON keeps only the last one)")
        row[key] = value
    return row


def _int(text: str) -> int:
    # Checked on the digits first: int() of thousands of digits is slow, and refused past 4300.
    if len(text.lstrip("-")) > 19 or abs(value := int(text)) >= INT64:
        raise _Refused(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is too large (more than 64 bits)")
    return value


def _float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"number {text[:24]} is too large (it overflows to infinity)")
    return value


def _depth(value) -> int:
    """How deeply lists and objects nest in `value` (iterative: no recursion on hostile input)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_int=_int, parse_float=_float)


def parse_json(
    text: str, path=None, line: int | None = None, start: int = 0, item_line: int | None = None
) -> tuple[Any, int]:
    """(value, end) of the JSON value at `text[start:]`, strictly (see the module docstring), or an InputError
    naming `path` and `line`; with `line` None, the parser's line for malformed JSON and `item_line` (where
    the value starts) for a value refused."""
    try:
        value, end = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as e:
        raise InputError(
            f"malformed JSON ({e.msg} at column {e.colno})", path, e.lineno if line is None else line
        ) from None
    except _Refused as e:
        raise InputError(str(e), path, item_line if line is None else line) from None
    except RecursionError:
        raise InputError(
            f"JSON nested more than {MAX_DEPTH} levels deep", path, item_line if line is None else line
        ) from None
    if _depth(value) > MAX_DEPTH:
        raise InputError(f"JSON nested more than {MAX_DEPTH} levels deep", path, item_line if line is None else line)
    return value, end


def loads(text: str, path=None, line: int | None = None) -> Any:
    """One whole JSON document, strictly (`parse_json`); trailing text is malformed JSON."""
    value, end = parse_json(text, path, line, len(text) - len(text.lstrip()))
    if text[end:].strip():
        lineno = line if line is not None else text.count("\n", 0, end) + 1
        raise InputError("malformed JSON (extra data after the value)", path, lineno)
    return value


def read_jsonl(
    path: str | os.PathLike, required: Iterable[str] = (), kind: str = "row", with_lines: bool = False
) -> list:
    """Rows of a JSONL file; each must be an object whose `required` fields are non-empty strings.

    With `with_lines`, (line number, row) pairs, for messages about a row found bad later.
    """
    path = check_input_file(path)
    rows = []
    with open(path, "rb") as f, processing(path):
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError("not UTF-8 text", path, lineno) from None
            if not line.strip():
                continue
            row = loads(line, path, lineno)
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
    "cb_alpha": "positive",
    "cb_skip_massive": "nonneg",
    "cb_warmup_steps": "count0",
    "trunk_cache_gb": "nonneg",
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
    "heldout_share": "open_fraction",
    "guard_max_new_tokens": "count0",
    "select_by_cliff": "ratio",
    "cliff_batch_size": "count",
}


def check_number(value, flag: str, rule: str, source=None, line: int | None = None) -> None:
    """An InputError naming `flag` unless `value` is a finite number obeying `rule` (see RULES)."""
    if value is None:
        return
    ok, what = RULES[rule]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise InputError(f"{flag} {what}, not {value}", source, line)
    if isinstance(value, int) and abs(value) >= INT64:  # every count ends up in a 64-bit integer somewhere
        raise InputError(f"{flag} is too large (more than 64 bits)", source, line)


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
    path = check_input_file(path, kind)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{kind} is not UTF-8 text", path) from None
    except OSError as e:
        raise InputError(f"cannot read this {kind} ({e.strerror or type(e).__name__})", path) from None


def check_fields(row: dict, required: Iterable[str], path, lineno, kind: str = "row") -> None:
    for field in required:
        if field not in row:
            raise InputError(f"{kind} is missing field '{field}'", path, lineno)
        if not isinstance(row[field], str):
            raise InputError(f"field '{field}' must be a string, got {type(row[field]).__name__}", path, lineno)
        if not row[field].strip():
            raise InputError(f"field '{field}' is empty", path, lineno)


# Errors of a write that failed for want of room or a working disk: reported as one line, nothing left half-written.
WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS)
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    with _UMASK_LOCK:  # the umask can only be read by setting it
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


def new_file_mode(path: Path) -> int:
    """The mode `open(path, "w")` would leave: an existing file's own, else 0o666 less the umask
    (mkstemp's 0o600 would hide shared results from the user's group)."""
    with suppress(OSError):
        return stat.S_IMODE(path.stat().st_mode)
    return 0o666 & ~current_umask()


def write_failed(path, e: OSError, what: str = "nothing was written") -> InputError:
    """The one line for a write the disk refused (full, quota, read-only, I/O error)."""
    return InputError(f"cannot write ({e.strerror or errno.errorcode.get(e.errno, 'error')}); {what}", path)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Write to a temp file beside `path` and rename it into place only on success.

    A full disk (or quota, or I/O error) is one line naming `path`, with the old file, if any, untouched.
    """
    path = Path(path)
    if path.exists() and not path.is_file():
        # Renaming over a device or pipe would replace the node itself (e.g. /dev/null, as root).
        raise InputError("exists and is not a regular file: outputs are files derta writes", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if e.errno in WRITE_ERRORS:
            raise write_failed(path, e) from None
        raise
    try:
        os.fchmod(fd, new_file_mode(path))
        with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno in WRITE_ERRORS:
            raise write_failed(path, e) from None
        raise


def json_text(obj: Any, path=None, **kw) -> str:
    """`obj` as JSON; NaN and infinities are refused (they are not JSON, and mean a broken number upstream)."""
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, **kw)
    except ValueError:
        raise InputError(f"refusing to write NaN or infinity into JSON: {_nonfinite_where(obj)}", path) from None


def _nonfinite_where(obj, where: str = "") -> str:
    """The first place in `obj` holding a NaN or infinity, as a key path ("curve[3].refusal_prob")."""
    stack = [(obj, where)]
    while stack:
        value, at = stack.pop(0)
        if isinstance(value, float) and not math.isfinite(value):
            return f"{at or 'value'} is {value}"
        if isinstance(value, dict):
            stack.extend((v, f"{at}.{k}" if at else str(k)) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, f"{at}[{i}]") for i, v in enumerate(value))
    return "a value is not finite"


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:  # a row that cannot be written leaves no file (atomic_open removes its temp file)
        for row in rows:
            f.write(json_text(row, path) + "\n")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    text = json_text(obj, path, indent=2) + "\n"
    with atomic_open(path) as f:
        f.write(text)


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
