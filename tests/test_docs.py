"""The documents run as written: every `derta` command line in README.md and docs/*.md parses with the real
parser, the README's own-data commands take a CSV file to a tuned and evaluated tiny model, and the Python
example of docs/python.md runs."""

import csv
import json
import re
import shlex
from pathlib import Path

import pytest

from derta.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def blocks(path: Path, languages=("", "bash", "sh", "shell")) -> list[str]:
    return [m.group(2) for m in FENCE.finditer(path.read_text()) if m.group(1) in languages]


def derta_argv(line: str) -> list[str] | None:
    """The arguments after `derta` (or `.venv/bin/derta`, `python -m derta`, `torchrun ... -m derta`) of a shell
    line, up to the end of that command, else None."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    for i, word in enumerate(words):
        starts = i == 0 or words[i - 1] in ("-m", "&&", ";") or all("=" in w for w in words[:i])
        if (word == "derta" or word.endswith("/derta")) and starts:
            rest = words[i + 1 :]
            ends = [k for k, w in enumerate(rest) if w in ("&&", ";", "|", ">", "2>")]
            return rest[: ends[0]] if ends else rest
    return None


def command_lines() -> list[tuple[str, str]]:
    """(where, line) of each shell line in a fenced block that runs derta; continuation lines are joined."""
    found = []
    for path in DOCUMENTS:
        for block in blocks(path):
            for line in block.replace("\\\n", " ").splitlines():
                if derta_argv(line) is not None:
                    found.append((path.name, line.strip()))
    return found


COMMANDS = command_lines()


def test_the_documents_show_commands():
    assert len(COMMANDS) > 20 and any(where == "README.md" for where, _ in COMMANDS)


@pytest.mark.parametrize("where, line", COMMANDS, ids=[f"{w}:{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_every_documented_command_line_parses(where, line, capsys):
    try:
        build_parser().parse_args(derta_argv(line))
    except SystemExit as e:
        assert e.code == 0, f"{where}: {line}\n{capsys.readouterr().err}"


def own_data_block() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Your own data") :]
    section = section[: section.index("\n## ", 3)]
    return next(b for b in blocks(ROOT / "README.md") if b in section)


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_readme_own_data_commands_take_a_csv_to_a_tuned_and_evaluated_model(tmp_path, monkeypatch, synthetic):
    lines = [line for line in own_data_block().splitlines() if line.strip()]
    assert len(lines) == 3 and [derta_argv(x)[0] for x in lines] == ["data", "train", "eval"]
    monkeypatch.chdir(tmp_path)
    assert main(["tiny", "--out", "tiny"]) == 0  # the README's "for a first try" model
    triple = ["instruction", "harmful_response", "safe_response"]
    write_csv(tmp_path / "my_safety.csv", synthetic.harmful_train[:24], triple)
    write_csv(tmp_path / "my_test.csv", synthetic.harmful_test[:6], ["instruction"])
    for line in lines:
        assert main(derta_argv(line)) == 0, line
    summary = json.loads((tmp_path / "eval-run" / "summary.json").read_text())
    assert set(summary["asr"]) == {"completion", "prefill"} and (tmp_path / "tuned" / "derta_train.json").exists()


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    examples = blocks(ROOT / "docs" / "python.md", ("python",))
    assert len(examples) == 2
    for code in examples:
        exec(compile(code, "docs/python.md", "exec"), {})
    out = capsys.readouterr().out
    assert "completion" in out and "loss" in out
    assert json.loads((tmp_path / "eval-run" / "summary.json").read_text())["asr"].keys() == {"completion", "prefill"}
