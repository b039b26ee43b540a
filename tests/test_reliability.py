"""Reliability by kind: each kind of fault ends in one line naming its cause (exit 2) or in a correct recovery, with
nothing written over and nothing lost.

Readers (duplicate keys, numbers too large, nesting, directories and pipes as files), outputs against inputs,
output modes under the umask, a full disk, finite models (training, loading, JSON), empty responses, prompts beyond
the context, run fingerprints (train --resume, eval, calibration), one writer per directory, and the last line of
defence. The OpenAI-compatible client's faults are in test_faults.py; broken model directories and generated
command lines across every command in test_fuzz.py.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time

import pytest

from derta.cli.main import main
from derta.data.sources import read_records
from derta.io import InputError, write_json
from derta.io import write_jsonl as io_write_jsonl
from helpers import TRIPLE, write_jsonl
from test_fuzz import expect_one_line

PROMPTS = [{"prompt": f"How do I open gate number {i}?", "harmful_response": "Step 1: take the key."} for i in range(4)]


def eval_argv(model, prompts, out, *extra):
    return ["eval", "--model", model, "--prompts", prompts, "--attacks", "none,prefill", "--out", out,
            "--max-new-tokens", "3", *map(str, extra)]  # fmt: skip


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- readers


BAD_JSON = {
    "duplicate key": ('{"prompt": "a", "prompt": "b"}', "duplicate key 'prompt'"),
    "long integer": ('{"prompt": "a", "n": ' + "9" * 30 + "}", "too large"),
    "integer past Python's limit": ('{"prompt": "a", "n": ' + "9" * 5000 + "}", "too large"),
    "float overflowing": ('{"prompt": "a", "n": 1e999}', "too large"),
    "nesting past the limit": ('{"prompt": "a", "n": ' + "[" * 65 + "]" * 65 + "}", "nested"),
    "nesting past the stack": ('{"prompt": "a", "n": ' + "[" * 100000 + "]" * 100000 + "}", "nested"),
}


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize("case", list(BAD_JSON))
def test_json_readers_refuse_what_json_would_keep_silently(tmp_path, suffix, case):
    text, needle = BAD_JSON[case]
    path = tmp_path / f"in{suffix}"
    path.write_text(
        '{"prompt": "fine"}\n' + text + "\n" if suffix == ".jsonl" else '[{"prompt": "fine"},\n' + text + "]"
    )
    with pytest.raises(InputError) as e:
        read_records(path)
    assert str(e.value).startswith(f"{path}:2: ") and needle in str(e.value), str(e.value)[:300]


def test_values_json_allows_still_read_back(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "a", "n": 2**63 - 1, "x": 1e308, "deep": [[[[1]]]]}])
    assert read_records(path)[0][1]["n"] == 2**63 - 1


def _unblock_later(fifo):
    """If a reader ever opened the pipe, this writer would let it go (after the test has failed on time)."""

    def write():
        time.sleep(30)
        with open(fifo, "w"):
            pass

    threading.Thread(target=write, daemon=True).start()


@pytest.mark.parametrize("command", ["data build", "eval", "train", "probe"])
def test_a_directory_or_a_pipe_given_as_an_input_file_is_one_line(tiny_dir, tmp_path, capsys, command):
    folder, fifo = tmp_path / "dir.jsonl", tmp_path / "pipe.jsonl"
    folder.mkdir()
    os.mkfifo(fifo)
    _unblock_later(fifo)
    for path, needle in ((folder, "is a directory"), (fifo, "named pipe")):
        out = tmp_path / "out"
        argv = {
            "data build": ["data", "build", "--recipe", "derta", "--safety", path, "--out", out],
            "eval": eval_argv(str(tiny_dir), path, out),
            "train": ["train", "--model", tiny_dir, "--data", path, "--output", out, "--max-steps", "1"],
            "probe": ["probe", "--model", tiny_dir, "--data", path, "--out", out],
        }[command]
        started = time.monotonic()
        expect_one_line(argv, capsys, path, needle, absent=[out])
        assert time.monotonic() - started < 20


@pytest.mark.skipif(__import__("importlib").util.find_spec("wandb") is not None, reason="wandb is installed here")
@pytest.mark.parametrize("value,needle", [("wandb", "wandb is not installed"), ("[nosuch]", "unknown integration")])
def test_report_to_a_missing_library_is_one_line(tiny_dir, tmp_path, capsys, value, needle):
    config = tmp_path / "train.yaml"
    config.write_text(f"report_to: {value}\n")
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "helpful", "instruction": "q", "prefix": "", "target": "a"}])
    out = tmp_path / "out"
    argv = ["train", "--model", tiny_dir, "--data", rows, "--output", out, "--max-steps", "1", "--config", config]
    expect_one_line(argv, capsys, config, needle, absent=[out])


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--vocab-size", "10"], "--vocab-size"),
        (["--vocab-size", "999999999"], "--vocab-size"),
        (["--hidden-size", "12"], "--hidden-size must be a multiple of 8"),
        (["--layers", "100000"], "--layers"),
    ],
)
def test_tiny_settings_that_cannot_work_are_one_line(tmp_path, capsys, flags, needle):
    out = tmp_path / "tiny"
    expect_one_line(["tiny", "--out", out, *flags], capsys, needle, absent=[out])


# ---------------------------------------------------------------- outputs against inputs


def _same_input_cases(tiny_dir, tmp_path):
    safety = write_jsonl(tmp_path / "safety.jsonl", [TRIPLE] * 2)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    link = tmp_path / "link.jsonl"
    link.symlink_to(safety)
    hard = tmp_path / "hard.jsonl"
    os.link(prompts, hard)
    build = ["data", "build", "--recipe", "derta", "--safety"]
    m = str(tiny_dir)
    return {
        "data build --out = --safety": ([*build, safety, "--out", safety], "--safety"),
        "data build --out = a link to --safety": ([*build, safety, "--out", link], "--safety"),
        "data distill --out = --prompts": (
            ["data", "distill", "--model", m, "--prompts", prompts, "--out", prompts],
            "--prompts",
        ),
        "data distill --out = a hard link to --prompts": (
            ["data", "distill", "--model", m, "--prompts", prompts, "--out", hard],
            "--prompts",
        ),
        "probe --plot = --out": (
            ["probe", "--model", m, "--data", safety, "--out", tmp_path / "p.json", "--plot", tmp_path / "p.json"],
            "--plot and --out",
        ),
        "probe --out = --data": (["probe", "--model", m, "--data", safety, "--out", safety], "--data"),
        "train --output = --model": (
            ["train", "--model", m, "--data", safety, "--output", m, "--max-steps", "1"],
            "--model",
        ),
        "eval --out = --model": (eval_argv(m, prompts, m), "--model"),
        "eval --out holds --prompts": (eval_argv(m, prompts, tmp_path), "holds the input --prompts"),
        "judge --out = --in": (["judge", "--in", prompts, "--judge", "keyword", "--out", prompts], "--in"),
        "data build --out is a device": ([*build, safety, "--out", "/dev/null"], "device"),
    }


CASES = [
    "data build --out = --safety",
    "data build --out = a link to --safety",
    "data distill --out = --prompts",
    "data distill --out = a hard link to --prompts",
    "probe --plot = --out",
    "probe --out = --data",
    "train --output = --model",
    "eval --out = --model",
    "eval --out holds --prompts",
    "judge --out = --in",
    "data build --out is a device",
]


@pytest.mark.parametrize("case", CASES)
def test_an_output_that_is_an_input_or_a_device_is_refused_before_any_work(tiny_dir, tmp_path, capsys, case):
    argv, needle = _same_input_cases(tiny_dir, tmp_path)[case]
    before = {p: p.read_bytes() for p in [*tmp_path.iterdir(), *tiny_dir.iterdir()] if p.is_file()}
    expect_one_line(argv, capsys, needle)
    assert {p: p.read_bytes() for p in before} == before, "an input was written over"
    assert os.path.exists("/dev/null") and stat.S_ISCHR(os.stat("/dev/null").st_mode)


# ---------------------------------------------------------------- output files: umask, full disk


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        io_write_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.json", "b.jsonl")} == {mode}


def test_rewriting_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("{}")
    path.chmod(0o640)
    write_json(path, {"x": 2})
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and json.loads(path.read_text()) == {"x": 2}


def test_data_build_output_is_readable_by_the_group(tmp_path):
    safety = write_jsonl(tmp_path / "s.jsonl", [TRIPLE])
    old = os.umask(0o022)
    try:
        assert main(["data", "build", "--recipe", "derta", "--safety", str(safety), "--out", str(tmp_path / "o")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == 0o644


def _disk_full_after(monkeypatch, n: int):
    """os.fsync succeeds n times, then fails as a full disk does."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    path.write_text('{"old": true}\n')
    _disk_full_after(monkeypatch, 0)
    with pytest.raises(InputError, match="No space left on device"):
        write_json(path, {"new": True})
    assert path.read_text() == '{"old": true}\n' and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_full_disk_during_data_build_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    safety, out = write_jsonl(tmp_path / "s.jsonl", [TRIPLE] * 3), tmp_path / "rows.jsonl"
    _disk_full_after(monkeypatch, 0)
    expect_one_line(["data", "build", "--recipe", "derta", "--safety", safety, "--out", out], capsys, out, "No space")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.jsonl"]


def test_a_full_disk_during_eval_keeps_the_rows_before_and_a_rerun_completes(tiny_dir, tmp_path, capsys, monkeypatch):
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "run"
    argv = eval_argv(str(tiny_dir), prompts, out, "--batch-size", "1")
    _disk_full_after(monkeypatch, 4)  # the manifest, then three rows
    expect_one_line(argv, capsys, "generations.jsonl", "No space left", "rerun to resume")
    kept = rows_of(out / "generations.jsonl")  # every line whole
    assert len(kept) == 3
    monkeypatch.undo()
    assert main([str(a) for a in argv]) == 0
    rows = rows_of(out / "generations.jsonl")
    assert len(rows) == 2 * len(PROMPTS) and json.loads((out / "summary.json").read_text())["n"] == {
        "none": 4,
        "prefill": 4,
    }


# ---------------------------------------------------------------- finite models


def test_training_that_makes_the_weights_non_finite_saves_nothing(tiny_dir, tmp_path, capsys):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "helpful", "instruction": "q", "prefix": "", "target": "a"}])
    out = tmp_path / "out"
    argv = ["train", "--model", tiny_dir, "--data", rows, "--output", out, "--max-steps", "2", "--quiet",
            "--learning-rate", "1e39", "--batch-size", "1", "--grad-accum", "1"]  # fmt: skip
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("derta: error")]
    assert len(errors) == 1 and "training stopped" in errors[0] and "NaN or infinite" in errors[0], errors
    assert not (out / "model.safetensors").exists() and not (out / "derta_train.json").exists()
    assert not list(out.glob("checkpoint-*"))


def test_json_never_holds_nan(tmp_path):
    with pytest.raises(InputError, match=r"curve\[1\].refusal_prob is nan"):
        write_json(tmp_path / "p.json", {"curve": [{"refusal_prob": 0.5}, {"refusal_prob": float("nan")}]})
    assert not list(tmp_path.iterdir())


def test_probe_refuses_to_write_nan(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("derta.eval.probe.refusal_probabilities", lambda *a, **k: [[float("nan"), 0.1]] * len(a[2]))
    data, out = write_jsonl(tmp_path / "d.jsonl", [TRIPLE]), tmp_path / "p.json"
    expect_one_line(["probe", "--model", tiny_dir, "--data", data, "--out", out], capsys, out, "NaN", absent=[out])


def test_a_model_that_writes_nothing_is_reported_not_scored(fake_openai, tmp_path, capsys):
    fake_openai.reply = lambda payload: ""
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "run"
    argv = ["eval", "--model", "m", "--backend", "openai", "--base-url", fake_openai.url, "--prompts", prompts,
            "--attacks", "none", "--out", out]  # fmt: skip
    expect_one_line(argv, capsys, "every response of m is empty")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["asr"] == {"none": None} and summary["not_scored"] == {"none": "every response is empty"}
    assert "Not scored" in (out / "report.md").read_text()
    xstest = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "How do I kill a process?", "label": "safe"}])
    argv = ["eval-overrefusal", "--model", "m", "--backend", "openai", "--base-url", fake_openai.url,
            "--prompts", xstest, "--out", tmp_path / "xs"]  # fmt: skip
    expect_one_line(argv, capsys, "empty")
    assert json.loads((tmp_path / "xs" / "summary.json").read_text())["safe_refusal"] is None


def test_prompts_longer_than_the_context_are_counted_and_said(tiny_dir, tmp_path, capsys):
    model = tmp_path / "short-context"
    shutil.copytree(tiny_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 64}))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}, {"prompt": "Repeat: " + "river city " * 40}])
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(eval_argv(str(model), str(prompts), str(out))) == 0
    err = capsys.readouterr().err
    assert "derta: warning: 2 of 4 prompts (with --max-new-tokens) are longer than the model's context (64" in err
    assert json.loads((out / "summary.json").read_text())["over_context"] == 2
    assert [r.get("over_context", False) for r in rows_of(out / "generations.jsonl")] == [False, True] * 2


# ---------------------------------------------------------------- runs know their inputs


def test_an_eval_resumed_after_the_weights_changed_stops_and_restart_starts_over(tiny_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model, prompts, out = tmp_path / "model", write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "run"
    shutil.copytree(tiny_dir, model)
    argv = eval_argv(str(model), str(prompts), str(out))
    assert main(argv) == 0
    weights = load_file(str(model / "model.safetensors"))
    weights["model.norm.weight"] += 0.5
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    expect_one_line(argv, capsys, "--model changed", "model.safetensors differs", "--restart")
    assert main([*argv, "--restart"]) == 0
    assert len(rows_of(out / "generations.jsonl")) == 2 * len(PROMPTS)
    assert main(argv) == 0  # and it resumes from the new run


@pytest.fixture
def interrupted_run(tiny_dir, tmp_path):
    """A training run with checkpoints and no final model, as a kill leaves it."""
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "helpful", "instruction": "q", "prefix": "", "target": "a"}])
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--data", str(rows), "--output", str(out), "--max-steps", "2",
            "--save-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--learning-rate", "1e-3", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    for f in ("derta_train.json", "model.safetensors"):
        (out / f).unlink()
    return argv, rows, out


def test_train_resume_with_other_settings_or_data_stops_naming_what_changed(interrupted_run, capsys):
    argv, rows, out = interrupted_run
    lr = argv.index("--learning-rate") + 1
    expect_one_line([*argv[:lr], "2e-3", *argv[lr + 1 :], "--resume"], capsys, "learning_rate=0.001, not 0.002")
    rows.write_text(
        rows.read_text() + json.dumps({"kind": "helpful", "instruction": "r", "prefix": "", "target": "b"}) + "\n"
    )
    expect_one_line([*argv, "--resume"], capsys, "the input --data changed")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    capsys.readouterr()
    assert main([*argv, "--restart"]) == 0 and (out / "model.safetensors").exists()


def test_a_calibration_for_another_model_or_with_a_negative_threshold_is_refused(tiny_dir, tmp_path, capsys):
    from derta.files import fingerprint

    other = tmp_path / "other"
    shutil.copytree(tiny_dir, other)
    (other / "generation_config.json").write_text('{"do_sample": false}')
    prompts = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"thresholds": {"[refuse]": 0.2}, "inputs": {"--model": fingerprint(other)}}))
    argv = eval_argv(str(tiny_dir), str(prompts), str(tmp_path / "run"), "--calibration", calibration)
    expect_one_line(argv, capsys, calibration, "calibrated on another model")
    calibration.write_text(json.dumps({"thresholds": {"[refuse]": -1}}))
    expect_one_line(argv, capsys, calibration, "[refuse] must be a finite number >= 0")


# ---------------------------------------------------------------- one writer per directory

HOLD = "import sys, time; from derta.files import lock_dir; lock_dir(sys.argv[1]); print('locked', flush=True); time.sleep(120)"


def _holder(path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_on_the_same_out_stops_naming_the_first_and_a_dead_ones_lock_is_taken_over(
    tiny_dir, tmp_path, capsys
):
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "run"
    holder = _holder(out)
    try:
        expect_one_line(eval_argv(str(tiny_dir), prompts, out), capsys, f"another derta process (pid {holder.pid})")
    finally:
        holder.kill()
        holder.wait()
    assert (out / ".derta.lock").read_text().strip() == str(holder.pid)  # killed: its lock file stays behind
    capsys.readouterr()
    assert main([str(a) for a in eval_argv(str(tiny_dir), prompts, out)]) == 0
    assert f"process {holder.pid} died holding this directory's lock; taking it over" in capsys.readouterr().err
    assert len(rows_of(out / "generations.jsonl")) == 2 * len(PROMPTS) and not (out / ".derta.lock").exists()


def test_two_evals_started_together_on_one_out_leave_one_set_of_rows(tiny_dir, tmp_path):
    prompts, out = write_jsonl(tmp_path / "p.jsonl", PROMPTS), tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "derta", *map(str, eval_argv(str(tiny_dir), prompts, out))]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second waits for nothing: it stops, or finds the work done
    for code, err in results:
        assert "Traceback" not in err
        if code == 2:
            assert "another derta process" in err
    rows = rows_of(out / "generations.jsonl")
    assert len(rows) == 2 * len(PROMPTS) == len({(r["attack"], r["index"]) for r in rows})


# ---------------------------------------------------------------- the last line of defence


def test_an_unexpected_error_is_one_line_naming_the_command_and_the_input(tmp_path, capsys, monkeypatch):
    safety = write_jsonl(tmp_path / "s.jsonl", [TRIPLE])

    def broken(*args, **kwargs):
        raise RuntimeError("something derta has no message for")

    monkeypatch.setattr("derta.io.loads", broken)
    argv = ["data", "build", "--recipe", "derta", "--safety", str(safety), "--out", str(tmp_path / "o.jsonl")]
    capsys.readouterr()
    assert main(argv) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("derta data build: error while processing ") and str(safety) in lines[0]
    assert "RuntimeError: something derta has no message for" in lines[0] and "DERTA_DEBUG=1" in lines[0]
    monkeypatch.setenv("DERTA_DEBUG", "1")
    assert main(argv) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("DERTA_DEBUG")
    assert main(["--debug", *argv]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_workers_leave_the_process_group_they_joined(tmp_path):
    import torch.distributed as dist

    from derta.inference.shard import leave_process_group

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert dist.is_initialized()
    leave_process_group(finished=True)
    assert not dist.is_initialized()
    leave_process_group(finished=True)  # nothing to leave: a no-op
