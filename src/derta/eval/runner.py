"""The one way derta runs a model over many inputs: a resumable run directory and a generate-and-record loop.

    DIR/manifest.json      the settings; resuming into DIR with other settings is refused
    DIR/generations.jsonl  one row per unit of work, appended and fsynced as each batch finishes

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
from pathlib import Path

from tqdm import tqdm

from derta.inference.base import GenInput
from derta.io import InputError, write_json, write_jsonl


def model_label(model, model_name: str | None = None) -> str:
    """What the manifest calls the model: `model_name`, else the path / hub ID / endpoint name, else a loaded model's name_or_path."""
    name = model_name or (model if isinstance(model, str) else getattr(model, "name_or_path", None))
    if not name:
        raise InputError("--model is required")
    return str(name)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


class RunDir:
    """An output directory whose rows survive kill -9: a manifest, then an append-only JSONL log.

    `key_of(row)` names a row's unit of work; rows read back are deduplicated on it.
    """

    def __init__(self, out: str | os.PathLike, manifest: dict, rows_file: str = "generations.jsonl"):
        self.dir = Path(out)
        self.manifest_path, self.rows_path = self.dir / "manifest.json", self.dir / rows_file
        self.manifest = manifest
        self._log = None

    def check(self) -> None:
        """Refuse a directory made with other settings, or one that is not a run directory.

        Nothing is written here: the manifest goes in with the first row, so a run that fails
        before producing anything (e.g. an unreachable endpoint) leaves no directory behind.
        """
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except ValueError:  # JSONDecodeError or UnicodeDecodeError
                old = None
            if not isinstance(old, dict):
                raise InputError("malformed manifest", self.manifest_path)
            for key in sorted(set(old) | set(self.manifest)):
                if old.get(key) != self.manifest.get(key):
                    raise InputError(
                        f"this run was made with {key}={_short(old.get(key))}, not {_short(self.manifest.get(key))}; "
                        "rerun with the same settings to resume, or use another --out",
                        self.manifest_path,
                    )
            return
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
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
        if self._log is None:
            if not self.manifest_path.is_file():
                write_json(self.manifest_path, self.manifest)
            self._log = open(self.rows_path, "a", encoding="utf-8")  # noqa: SIM115 (open across appends, until close())
        self._log.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


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
            disable=None if progress is None else not progress,
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
        for row in score([items[j] for j in idx], responses):
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
