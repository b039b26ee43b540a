"""The one way derta runs a model over many inputs: a resumable run directory and a generate-and-record loop.

    DIR/manifest.json      the settings and the inputs' fingerprints (`files.fingerprint`); resuming into DIR
                           with other settings, or after an input changed, is refused
    DIR/generations.jsonl  one row per unit of work, appended and fsynced as each batch finishes
    DIR/.derta.lock        while a process works in DIR (`files.lock_dir`): a second one is refused

`derta eval`, `eval-helpful`, `eval-overrefusal`, `data distill` and the demo all go through `run_task`
(or, for `derta eval`'s mixed static and search attacks, its two parts `Recorder` and `generate_into`):
rerunning the same command reads the finished rows back (a row torn by kill -9 is cut off) and generates
only the missing ones; with nothing missing, no model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Hashable
from contextlib import suppress
from pathlib import Path

from tqdm import tqdm

from derta.files import compare_manifest, fingerprints, is_lock_file, lock_dir, release
from derta.inference.base import GenInput
from derta.io import (
    WRITE_ERRORS,
    InputError,
    check_input_file,
    json_text,
    show_progress,
    write_failed,
    write_json,
    write_jsonl,
)


def model_label(model, model_name: str | None = None) -> str:
    """What the manifest calls the model: `model_name`, else the path / hub ID / endpoint name, else a loaded model's name_or_path."""
    name = model_name or (model if isinstance(model, str) else getattr(model, "name_or_path", None))
    if not name:
        raise InputError("--model is required")
    return str(name)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(check_input_file(path).read_bytes()).hexdigest()


def text_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


class RunDir:
    """An output directory whose rows survive kill -9: a manifest, then an append-only JSONL log.

    `key_of(row)` names a row's unit of work; rows read back are deduplicated on it. The manifest records, under
    "inputs", the fingerprints (`files.fingerprints`) of the model when `manifest["model"]` is a local path, and of
    `inputs` ({flag: path}).
    """

    def __init__(
        self, out: str | os.PathLike, manifest: dict, rows_file: str = "generations.jsonl", inputs: dict | None = None
    ):
        self.dir = Path(out)
        self.manifest_path, self.rows_path = self.dir / "manifest.json", self.dir / rows_file
        model = manifest.get("model")
        found = fingerprints({"--model": model if isinstance(model, str) else None, **(inputs or {})})
        self.manifest = {**manifest, "inputs": found} if found else manifest
        self._log = None
        self._locked = self._wrote = False

    def check(self) -> None:
        """Take the directory's lock, then refuse one made with other settings or inputs, or one that is not a run
        directory.

        Nothing else is written here: the manifest goes in with the first row, so a run that fails before
        producing anything (e.g. an unreachable endpoint) leaves no directory behind.
        """
        if self.dir.exists() and not self.dir.is_dir():
            raise InputError("exists and is not a directory", self.dir)
        if not self._locked:
            lock_dir(self.dir)
            self._locked = True
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except ValueError:  # JSONDecodeError or UnicodeDecodeError
                old = None
            if not isinstance(old, dict):
                raise InputError("malformed manifest", self.manifest_path)
            compare_manifest(old, self.manifest, self.manifest_path)
            return
        if any(not is_lock_file(p) for p in self.dir.iterdir()):
            raise InputError("exists and is not a derta run directory (no manifest.json); use another --out", self.dir)

    def read_rows(self, key_of) -> dict:
        """Finished rows by key. A torn last line (killed mid-write) is cut off the file."""
        rows: dict = {}
        if not self.rows_path.is_file():
            return rows
        data = self.rows_path.read_bytes()
        good_end = 0
        for lineno, line in enumerate(data.splitlines(keepends=True), 1):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a row")
            except ValueError:
                if good_end + len(line) < len(data):  # not the last line: damage we did not make
                    raise InputError("malformed row (not written by derta?)", self.rows_path, lineno) from None
                break
            good_end += len(line)
            rows.setdefault(key_of(row), row)
        if good_end < len(data):
            with open(self.rows_path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
        return rows

    def append(self, row: dict) -> None:
        """Add one row and fsync it. A write the disk refuses (full, quota) is one line; the file is cut back to the
        rows before, so rerunning the command resumes from them."""
        line = (json_text(row, self.rows_path) + "\n").encode("utf-8")
        if self._log is None:
            if not self.manifest_path.is_file():
                write_json(self.manifest_path, self.manifest)
            self._log = open(self.rows_path, "ab")  # noqa: SIM115 (open across appends, until close())
            self._wrote = True
        end = self._log.tell()
        try:
            self._log.write(line)
            self._log.flush()
            os.fsync(self._log.fileno())
        except OSError as e:
            if e.errno not in WRITE_ERRORS:
                raise
            with suppress(OSError):  # closing flushes what is left in the buffer, which fails the same way
                self._log.close()
            self._log = None
            with open(self.rows_path, "r+b") as f:
                f.truncate(end)
            raise write_failed(self.rows_path, e, "the rows before this one are kept: rerun to resume") from None

    def close(self) -> None:
        """Close the log. The lock stays until the command ends (`files.release_all`), so no other process slips
        in between the last row and the summary; a run that wrote nothing gives it back at once (and a directory
        it created is removed again)."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._locked and not self._wrote and not self.manifest_path.exists():
            release(self.dir)
            self._locked = False


def discard_run(out: str | os.PathLike) -> None:
    """Start a run directory over (`--restart`): under its lock, remove what a run wrote there (manifest, rows,
    summary, report); a directory that is not a run directory is left alone (RunDir.check then refuses it)."""
    out = Path(out)
    if not (out / "manifest.json").is_file():
        return
    lock_dir(out)
    for f in ["manifest.json", "summary.json", "report.md", *(p.name for p in out.glob("generations*.jsonl"))]:
        (out / f).unlink(missing_ok=True)


class Recorder:
    """Appends each finished row to the run directory (if any), keeps it by key, and moves the progress bar.

    The bar counts rows (`total`, starting at those already done); it is off when `progress` is False, and by
    default (None) when stderr is not a terminal.
    """

    def __init__(
        self,
        run: RunDir | None,
        rows: dict,
        key_of: Callable[[dict], Hashable],
        total: int,
        desc: str,
        progress: bool | None = None,
    ):
        self.run, self.rows, self.key_of = run, rows, key_of
        self.bar = tqdm(
            total=total,
            initial=len(rows),
            desc=desc,
            unit="row",
            leave=False,
            disable=not show_progress(progress),
        )

    def __call__(self, row: dict) -> None:
        if self.run is not None:
            self.run.append(row)
        self.rows[self.key_of(row)] = row
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.run is not None:
            self.run.close()


def generate_into(
    record: Callable[[dict], None], backend, items: list[tuple[Hashable, GenInput]], score, shard=None
) -> None:
    """Generate `items` [(key, input)] in one pooled stream (the backend batches them by length) and record each
    batch's rows as soon as it is scored: `score(batch, responses)` -> rows, `batch` the batch's (key, input)s.

    With a `shard` of several processes, each generates only its own batches.
    """
    batches = backend.generate_iter(
        [inp for _, inp in items], **({"shard": shard} if shard and shard.world > 1 else {})
    )
    for idx, responses in batches:
        long = getattr(backend, "over_context", ())  # inputs beyond the model's context: flagged in their rows
        resets = getattr(backend, "resets", ())  # a backtracking model's [RESET] (inference.base.after_reset)
        for j, row in zip(idx, score([items[j] for j in idx], responses)):
            if j in long:
                row["over_context"] = True
            if j in resets:
                row["reset"] = True
            record(row)


def run_task(
    run: RunDir | None,
    items: list[tuple[Hashable, GenInput]],
    make_backend: Callable[[], object],
    score,
    key_of: Callable[[dict], Hashable] = lambda row: row["index"],
    desc: str = "generate",
    progress: bool | None = None,
) -> dict:
    """Every item's row, by key: the rows `run` already holds, then the missing ones generated and scored
    (`score(batch, responses, backend)` -> rows). `make_backend` is called only when something is missing.
    `run` None keeps the rows in memory only.
    """
    rows = run.read_rows(key_of) if run is not None else {}
    todo = [(key, inp) for key, inp in items if key not in rows]
    if todo:
        backend = make_backend()
        record = Recorder(run, rows, key_of, len(items), desc, progress)
        try:
            generate_into(record, backend, todo, lambda batch, responses: score(batch, responses, backend))
        finally:
            record.close()
    return rows


def ordered_rows(run: RunDir | None, rows: dict, keys, rewrite: bool = False) -> list[dict]:
    """The rows in `keys` order; the run's generations.jsonl is rewritten in that order when it is not (batches
    finish longest first), or when `rewrite` (rows merged from several processes' files), so a finished run's
    file does not depend on batching, on the number of processes or on where it was resumed."""
    ordered = [rows[k] for k in keys]
    if run is not None and (rewrite or list(rows.values()) != ordered):
        write_jsonl(run.rows_path, ordered)
    return ordered
