"""Paths a command reads and writes: outputs checked against inputs, fingerprints of inputs, one writer per directory.

- `check_outputs`: before any work, an output that is an input (the same file or directory, through any link), that
  holds one, that another output also names, or that is a device or pipe, is one line naming both flags.
- `fingerprint`: what a run directory records about each input (a file's size and sha256; for a file over
  FULL_HASH_BYTES, its size, modification time and the sha256 of its first MiB; for a model directory, that of each
  file in it), so a resume after the data or the weights changed stops with one line naming what changed.
- `lock_dir`: one derta process writes to a run directory at a time (`DIR/.derta.lock`, flock'd, holding the pid);
  a second one stops with one line naming the first; a lock left by a process that died is taken over, saying so.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import stat
import sys
from contextlib import suppress
from pathlib import Path

from derta.io import InputError

FULL_HASH_BYTES = 1 << 30  # files up to 1 GiB are hashed whole (about a second); larger ones by size, time and head
HEAD_BYTES = 1 << 20
LOCK_NAME = ".derta.lock"


# ---------------------------------------------------------------- outputs against inputs


def _real(path) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _inside(child: str, parent: str) -> bool:
    return child != parent and child.startswith(parent.rstrip(os.sep) + os.sep)


def check_outputs(outputs: list[tuple[str, str, bool]], inputs: list[tuple[str, str]]) -> None:
    """`outputs` (flag, path, is a directory) against `inputs` (flag, path) and each other; InputError on a clash.

    Inputs that are not on this machine (hub IDs, dataset names) are skipped.
    """
    seen: dict[str, str] = {}
    for flag, path, is_dir in outputs:
        real = _real(path)
        if os.path.exists(real):
            mode = os.stat(real).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise InputError(f"{flag}: is a device, pipe or socket, not a file derta can write", path)
        if real in seen:
            raise InputError(f"{flag} and {seen[real]} name the same path: give each output its own", path)
        seen[real] = flag
        for in_flag, in_path in inputs:
            if not os.path.exists(os.path.expanduser(str(in_path))):
                continue
            other = _real(in_path)
            if other == real or os.path.exists(real) and os.path.samefile(real, other):  # hard links too
                raise InputError(f"{flag} is also the input {in_flag}: writing it would destroy the input", path)
            if is_dir and _inside(other, real):
                raise InputError(
                    f"{flag} holds the input {in_flag} ({in_path}): give the output a directory of its own", path
                )


# ---------------------------------------------------------------- fingerprints


def _file_fingerprint(path: Path, st: os.stat_result) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            while chunk := f.read(HEAD_BYTES):
                h.update(chunk)
            return {"size": st.st_size, "sha256": h.hexdigest()}
        h.update(f.read(HEAD_BYTES))  # a safetensors file's header (tensor names, shapes, offsets) is at its start
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256_first_mib": h.hexdigest()}


def fingerprint(path) -> dict | None:
    """What identifies the input at `path` (see the module docstring); None when it is not a local file or
    directory (a hub ID, a dataset name). A directory's subdirectories (checkpoints) and hidden files are left out."""
    if path is None:
        return None
    p = Path(os.path.expanduser(str(path)))
    try:
        st = p.stat()
        if stat.S_ISREG(st.st_mode):
            return _file_fingerprint(p, st)
        if stat.S_ISDIR(st.st_mode):
            files = sorted(f for f in p.iterdir() if not f.name.startswith(".") and f.is_file())
            return {f.name: _file_fingerprint(f, f.stat()) for f in files}
    except OSError:
        return None
    return None


def fingerprints(named: dict) -> dict:
    """{flag: fingerprint} of the named inputs that are local files or directories."""
    found = {flag: fingerprint(path) for flag, path in named.items() if path is not None}
    return {flag: fp for flag, fp in found.items() if fp is not None}


def _differs(old: dict, new: dict) -> str:
    """Which part of an input changed, in a few words."""
    if "size" not in old and "size" not in new:  # directories: the first file that changed
        for name in sorted(set(old) | set(new)):
            if name not in new:
                return f"{name} is gone"
            if name not in old:
                return f"{name} is new"
            if old[name] != new[name]:
                return f"{name} differs"
    return "its contents differ"


def changed_inputs(old: dict | None, new: dict | None) -> str | None:
    """What changed between two `fingerprints` records, or None (inputs recorded on one side only are not compared:
    a run from before fingerprints, or an input given as a hub ID)."""
    old, new = old or {}, new or {}
    for flag in sorted(set(old) & set(new)):
        if old[flag] != new[flag]:
            return f"the input {flag} changed since this run started ({_differs(old[flag], new[flag])})"
    return None


def short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def compare_manifest(old: dict, new: dict, path, restart_flag: str = "--restart") -> None:
    """An InputError naming the first setting or input (`inputs`) that differs between a run's recorded manifest and
    the one asked for now; the way out is `restart_flag` or another output."""
    fix = f"rerun with the same settings to resume, pass {restart_flag} to start over, or use another output"
    for key in sorted((set(old) | set(new)) - {"inputs"}):
        if old.get(key) != new.get(key):
            raise InputError(
                f"this run was made with {key}={short(old.get(key))}, not {short(new.get(key))}; {fix}", path
            )
    what = changed_inputs(old.get("inputs"), new.get("inputs"))
    if what:
        raise InputError(f"{what}; {fix}", path)


# ---------------------------------------------------------------- one writer per directory

_HELD: dict[str, list] = {}  # real path -> [lock fd, directories created here (deepest first), times taken]


def _main_process() -> bool:
    # Under torchrun the main process holds the lock for all: the others write beside it by design.
    return int(os.environ.get("RANK", "0")) == 0


def lock_dir(path, flag: str = "--out") -> None:
    """Take `path`'s lock (creating the directory), or an InputError naming the process that holds it.

    Re-entrant within a process; released by `release` / `release_all` (the CLI, at the end of each command),
    at exit, or by the kernel when the process dies (flock), which leaves the file for the next run to take over.
    """
    real = _real(path)
    if not _main_process():
        os.makedirs(real, exist_ok=True)  # it may write its part before the main process has made the directory
        return
    if real in _HELD:
        _HELD[real][2] += 1
        return
    created, up = [], real
    while not os.path.exists(up):
        created.append(up)
        up = os.path.dirname(up)
    os.makedirs(real, exist_ok=True)
    lock_path = os.path.join(real, LOCK_NAME)
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InputError(
                f"{flag}: another derta process (pid {holder}) is writing to this directory; "
                f"wait for it to finish or use another {flag}",
                path,
            ) from None
        try:  # a holder releasing unlinks the file: the lock is ours only if the file is still the one at the path
            if os.fstat(fd).st_ino == os.stat(lock_path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    before = os.read(fd, 32).decode(errors="replace").strip()
    if before and before != str(os.getpid()):
        print(f"derta: {path}: process {before} died holding this directory's lock; taking it over", file=sys.stderr)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[real] = [fd, created, 1]


def release(path, force: bool = False) -> None:
    """Give `path`'s lock back (once per `lock_dir`, or at once with `force`); a directory this process created and
    left empty is removed, so a command that failed before writing anything leaves nothing behind."""
    real = _real(path)
    held = _HELD.get(real)
    if held is None:
        return
    held[2] -= 1
    if held[2] > 0 and not force:
        return
    fd, created, _ = _HELD.pop(real)
    with suppress(OSError):
        os.unlink(os.path.join(real, LOCK_NAME))
    os.close(fd)
    for d in created:
        try:
            os.rmdir(d)  # only when empty
        except OSError:
            break


def release_all() -> None:
    for real in list(_HELD):
        release(real, force=True)


def is_lock_file(path: Path) -> bool:
    return path.name == LOCK_NAME


atexit.register(release_all)
