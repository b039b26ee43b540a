"""Training: DeRTa teaches refusal at every response position, LoRA, resuming, configs, bad input.

The runs are tiny (a ~1M-parameter model, 120 steps of batch 8 on 240 synthetic rows) but the
effects are far from the thresholds: over training seeds 1, 2, 3, 6, 7 and 42 the DeRTa run
reached a mean refusal probability of 0.94-0.95 inside held-out harmful responses (0.001
untrained) and 0.03-0.05 inside helpful ones; the vanilla run 0.007-0.008 inside harmful
responses but 0.84-0.86 at their start.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from derta.cli.main import build_parser, main
from derta.eval.probe import refusal_probabilities
from derta.models.loading import load_model
from derta.models.templates import encode_prompt, encode_text, format_prompt
from derta.train.config import config_from_cli
from derta.train.run import train
from helpers import write_jsonl

N_SAFETY, N_HELPFUL, STEPS = 80, 80, 120
N_PROBE = 24


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("derta: error: ")
    return lines[0]


def train_args(model, data, out, steps, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        str(steps),
        "--batch-size",
        "8",
        "--grad-accum",
        "1",
        "--learning-rate",
        "1e-3",
        "--quiet",
        *extra,
    ]


def config_for(argv):
    """The DertaConfig the CLI would build for `argv` (for library runs with callbacks)."""
    args = build_parser().parse_args(argv)
    return config_from_cli(args), args


@pytest.fixture(scope="module")
def work(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("train")
    safety = write_jsonl(root / "safety.jsonl", synthetic.harmful_train[:N_SAFETY])
    helpful = write_jsonl(root / "helpful.jsonl", synthetic.helpful_train[:N_HELPFUL])
    for recipe in ("derta", "vanilla"):
        assert (
            main(
                [
                    "data",
                    "build",
                    "--recipe",
                    recipe,
                    "--safety",
                    str(safety),
                    "--helpful",
                    str(helpful),
                    "--out",
                    str(root / f"{recipe}.jsonl"),
                ]
            )
            == 0
        )
    # A small mixture for the runs that test mechanics rather than learning.
    small_safety = write_jsonl(root / "small_safety.jsonl", synthetic.harmful_train[:8])
    small_helpful = write_jsonl(root / "small_helpful.jsonl", synthetic.helpful_train[:8])
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "derta",
                "--safety",
                str(small_safety),
                "--helpful",
                str(small_helpful),
                "--out",
                str(root / "small.jsonl"),
            ]
        )
        == 0
    )
    return root


def inside_mean(per_example):
    """Mean refusal probability at the positions after the response has started."""
    return float(np.mean([np.mean(p[1:]) for p in per_example]))


def start_mean(per_example):
    return float(np.mean([p[0] for p in per_example]))


@pytest.fixture(scope="module")
def probe_pairs(synthetic):
    harmful = [(r["instruction"], r["harmful_response"]) for r in synthetic.harmful_test[:N_PROBE]]
    helpful = [(r["instruction"], r["response"]) for r in synthetic.helpful_test[:N_PROBE]]
    return harmful, helpful


def measure(model_dir, tokenizer, probe_pairs):
    model = load_model(str(model_dir))
    harmful, helpful = (refusal_probabilities(model, tokenizer, pairs) for pairs in probe_pairs)
    return {"harm_start": start_mean(harmful), "harm_inside": inside_mean(harmful), "help_inside": inside_mean(helpful)}


@pytest.fixture(scope="module")
def untrained(tiny_dir, tiny_tokenizer, probe_pairs):
    return measure(tiny_dir, tiny_tokenizer, probe_pairs)


@pytest.fixture(scope="module")
def derta_run(work, tiny_dir):
    out = work / "derta_out"
    assert main(train_args(tiny_dir, work / "derta.jsonl", out, STEPS)) == 0
    return out


@pytest.fixture(scope="module")
def vanilla_run(work, tiny_dir):
    out = work / "vanilla_out"
    assert main(train_args(tiny_dir, work / "vanilla.jsonl", out, STEPS)) == 0
    return out


# ---------------------------------------------------------------- learning


def test_derta_run_logs_both_losses_and_loss_falls(derta_run):
    info = json.loads((derta_run / "derta_train.json").read_text())
    assert info["steps"] == STEPS
    rows = info["rows"]
    assert (rows["helpful"], rows["prefix"], rows["rto"], rows.get("safe", 0)) == (N_HELPFUL, N_SAFETY, N_SAFETY, 0)
    history = info["log_history"]
    assert [h["step"] for h in history] == list(range(10, STEPS + 1, 10))
    for h in history:
        assert np.isfinite(h["mle_loss"]) and np.isfinite(h["rto_loss"])
    first, last = history[0], history[-1]
    assert last["loss"] < 0.6 * first["loss"], (first, last)
    assert last["mle_loss"] < first["mle_loss"] and last["rto_loss"] < 0.3 * first["rto_loss"]
    # The weights on disk are the trained ones and load like any checkpoint.
    model = AutoModelForCausalLM.from_pretrained(derta_run)
    tok = AutoTokenizer.from_pretrained(derta_run)
    assert model.config.vocab_size == len(tok)
    assert not any(p.name.endswith(".bin") for p in derta_run.iterdir())


def test_derta_raises_refusal_inside_harmful_responses_not_helpful(derta_run, tiny_tokenizer, probe_pairs, untrained):
    trained = measure(derta_run, tiny_tokenizer, probe_pairs)
    assert untrained["harm_inside"] < 0.05 and untrained["help_inside"] < 0.05, untrained
    # Held-out harmful prompts: refusal is likely at the start AND inside the harmful response. The start
    # gets fewer labels than the inside (one per RTO row, plus the k = 0 prefix rows): 0.43 here after 120
    # steps from a random model, against 0.001 untrained.
    assert trained["harm_start"] > 0.3, trained
    assert trained["harm_inside"] > 0.6 and trained["harm_inside"] > untrained["harm_inside"] + 0.5, trained
    # Held-out helpful answers are not interrupted.
    assert trained["help_inside"] < 0.2, trained


def test_vanilla_has_position_bias_derta_does_not(derta_run, vanilla_run, tiny_tokenizer, probe_pairs):
    vanilla = measure(vanilla_run, tiny_tokenizer, probe_pairs)
    derta = measure(derta_run, tiny_tokenizer, probe_pairs)
    # Vanilla learned to refuse -- but only at the start of a response.
    assert vanilla["harm_start"] > 0.5, vanilla
    assert vanilla["harm_inside"] < 0.1, vanilla
    assert derta["harm_inside"] > vanilla["harm_inside"] + 0.5, (derta, vanilla)
    history = json.loads((vanilla_run / "derta_train.json").read_text())["log_history"]
    assert all("rto_loss" not in h for h in history) and all("mle_loss" in h for h in history)


# ---------------------------------------------------------------- LoRA


class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def logits_of(model, tokenizer, synthetic):
    row = synthetic.harmful_test[0]
    ids = encode_prompt(tokenizer, format_prompt(tokenizer, row["instruction"])) + encode_text(
        tokenizer, row["harmful_response"]
    )
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_lora_trains_adapter_only_and_merge_matches(work, tiny_dir, tiny_tokenizer, synthetic):
    base_weights = load_file(tiny_dir / "model.safetensors")
    adapter_dir, merged_dir = work / "lora", work / "lora_merged"
    argv = train_args(tiny_dir, work / "small.jsonl", adapter_dir, 6, "--lora", "--lora-r", "8", "--seed", "3")
    argv[argv.index("--learning-rate") + 1] = "1e-2"
    config, _ = config_for(argv)
    keep = KeepModel()
    train(config, str(tiny_dir), str(work / "small.jsonl"), callbacks=[keep])
    live = keep.model

    # Only adapter weights were trainable, and the base weights did not move.
    trainable = [n for n, p in live.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    live_state = {
        n.replace("base_model.model.", "", 1).replace(".base_layer", ""): p
        for n, p in live.state_dict().items()
        if "lora_" not in n
    }
    for name, weight in base_weights.items():
        assert torch.equal(live_state[name], weight), name

    # The saved adapter is only the adapter, and it loads back to the same model.
    names = {p.name for p in adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    saved = load_file(adapter_dir / "adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in saved.items()), "adapter did not train"
    live_logits = logits_of(live, tiny_tokenizer, synthetic)
    loaded_logits = logits_of(AutoModelForCausalLM.from_pretrained(adapter_dir), tiny_tokenizer, synthetic)
    base_logits = logits_of(AutoModelForCausalLM.from_pretrained(tiny_dir), tiny_tokenizer, synthetic)
    assert torch.allclose(loaded_logits, live_logits, atol=1e-5)
    assert (loaded_logits - base_logits).abs().max() > 0.1, "the adapter changes nothing"

    # --merge: the same run saved as one full model, giving the adapter's logits.
    merged_argv = argv + ["--merge"]
    merged_argv[merged_argv.index("--output") + 1] = str(merged_dir)
    assert main(merged_argv) == 0
    names = {p.name for p in merged_dir.iterdir()}
    assert (
        "model.safetensors" in names and "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert not hasattr(merged, "peft_config") or not merged.peft_config
    assert torch.allclose(logits_of(merged, tiny_tokenizer, synthetic), loaded_logits, atol=1e-4)


# ---------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


class Steps(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(state.global_step)


class CrashAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Crash(f"simulated crash at step {state.global_step}")


def resume_argv(tiny_dir, data, out):
    argv = train_args(tiny_dir, data, out, 8, "--save-steps", "3", "--logging-steps", "2", "--seed", "11")
    argv[argv.index("--batch-size") + 1] = "4"
    return argv


def test_resume_after_crash_equals_uninterrupted_run(work, tiny_dir, capsys):
    data = work / "small.jsonl"
    whole, crashed = work / "whole", work / "crashed"
    assert main(resume_argv(tiny_dir, data, whole)) == 0

    config, _ = config_for(resume_argv(tiny_dir, data, crashed))
    with pytest.raises(Crash):
        train(config, str(tiny_dir), str(data), callbacks=[CrashAt(5)])
    assert sorted(p.name for p in crashed.glob("checkpoint-*")) == ["checkpoint-3"]
    assert not (crashed / "derta_train.json").exists() and not (crashed / "model.safetensors").exists()

    # Without --resume the checkpoints are not silently overwritten.
    capsys.readouterr()
    assert main(resume_argv(tiny_dir, data, crashed)) == 2
    line = one_error_line(capsys)
    assert str(crashed) in line and "--resume" in line

    config, args = config_for(resume_argv(tiny_dir, data, crashed) + ["--resume"])
    steps = Steps()
    train(config, str(tiny_dir), str(data), resume=args.resume, callbacks=[steps])
    assert steps.seen == [4, 5, 6, 7, 8], "continues after the checkpoint rather than starting over"
    info = json.loads((crashed / "derta_train.json").read_text())
    assert info["steps"] == 8
    a, b = load_file(whole / "model.safetensors"), load_file(crashed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    base = load_file(tiny_dir / "model.safetensors")
    assert any(not torch.allclose(a[n], base[n]) for n in a), "training changed nothing"
    # Losses logged after the resume point match the uninterrupted run's.
    logged = {h["step"]: h["loss"] for h in json.loads((whole / "derta_train.json").read_text())["log_history"]}
    resumed = {h["step"]: h["loss"] for h in info["log_history"]}
    for step in (6, 8):
        assert resumed[step] == pytest.approx(logged[step], rel=1e-4)


def test_rerun_into_finished_dir_is_refused(work, tiny_dir, capsys):
    data = work / "small.jsonl"
    out = work / "finished"
    argv = train_args(tiny_dir, data, out, 2)
    assert main(argv) == 0
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert main(argv) == 2
    assert str(out) in one_error_line(capsys)
    # Even with its checkpoints cleaned away, a finished model is not overwritten.
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert str(out) in line and "finished" in line
    assert (out / "model.safetensors").read_bytes() == weights


# ---------------------------------------------------------------- config and bad input


def test_yaml_config_is_honoured(work, tiny_dir, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("logging_steps: 2\nlr_scheduler_type: constant\nwarmup_steps: 0\nmax_length: 64\n")
    out = tmp_path / "out"
    assert main(train_args(tiny_dir, work / "small.jsonl", out, 4, "--config", str(config))) == 0
    info = json.loads((out / "derta_train.json").read_text())
    assert [h["step"] for h in info["log_history"]] == [2, 4]
    assert all(h["learning_rate"] == pytest.approx(1e-3) for h in info["log_history"])
    assert info["config"]["logging_steps"] == 2 and info["config"]["max_length"] == 64
    # Explicit flags win over the file.
    out2 = tmp_path / "out2"
    assert (
        main(train_args(tiny_dir, work / "small.jsonl", out2, 4, "--config", str(config), "--logging-steps", "4")) == 0
    )
    assert [h["step"] for h in json.loads((out2 / "derta_train.json").read_text())["log_history"]] == [4]


def test_yaml_unknown_field_is_refused(work, tiny_dir, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("logging_steps: 2\nlearnin_rate: 0.1\n")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(train_args(tiny_dir, work / "small.jsonl", out, 4, "--config", str(config))) == 2
    line = one_error_line(capsys)
    assert str(config) in line and "learnin_rate" in line
    assert not out.exists()


@pytest.mark.parametrize(
    "bad_line,lineno",
    [('{"kind": "helpful", "instruction": "Hi"', 2), ('{"kind": "bogus", "instruction": "Hi", "target": "ok"}', 2)],
)
def test_malformed_training_rows_name_file_and_line(tiny_dir, tmp_path, capsys, bad_line, lineno):
    good = json.dumps({"kind": "helpful", "instruction": "Repeat: cat", "prefix": "", "target": "cat"})
    data = tmp_path / "rows.jsonl"
    data.write_text(f"{good}\n{bad_line}\n{good}\n")
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(train_args(tiny_dir, data, out, 2)) == 2
    assert f"{data}:{lineno}:" in one_error_line(capsys)
    assert not (out / "model.safetensors").exists()


def test_rows_tokenized_for_another_model_are_refused(tiny_dir, tmp_path, capsys):
    good = json.dumps({"kind": "helpful", "instruction": "Repeat: cat", "prefix": "", "target": "cat"})
    foreign = json.dumps({"kind": "safe", "input_ids": [1, 5, 128000], "labels": [-100, 5, 128000]})
    data = tmp_path / "rows.jsonl"
    data.write_text(f"{good}\n\n{foreign}\n")
    capsys.readouterr()
    assert main(train_args(tiny_dir, data, tmp_path / "out", 2)) == 2
    line = one_error_line(capsys)
    assert f"{data}:3:" in line and "another model" in line


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--max-steps", "-5"),
        ("--batch-size", "0"),
        ("--max-length", "-1"),
        ("--grad-accum", "0"),
        ("--lora-r", "0"),
        ("--epochs", "nan"),
        ("--learning-rate", "inf"),
        ("--rto-weight", "nan"),
        ("--rto-keep-ratio", "0"),
    ],
)
def test_out_of_range_settings_name_the_flag(work, tiny_dir, capsys, flag, value):
    argv = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(work / "small.jsonl"),
        "--output",
        str(work / "never"),
        flag,
        value,
    ]
    assert main(argv) == 2
    assert flag in one_error_line(capsys)
    assert not (work / "never").exists()


def test_nonfinite_loss_stops_the_run_without_saving_a_model(work, tiny_dir, capsys):
    out = work / "nan"
    assert main(train_args(tiny_dir, work / "small.jsonl", out, 6, "--learning-rate", "1e30", "--save-steps", "1")) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("derta: error")]
    assert (
        len(errors) == 1
        and "training stopped at step" in errors[0]
        and ("loss is" in errors[0] or "weight tensors hold NaN" in errors[0])
    )
    assert not (out / "model.safetensors").exists() and not (out / "derta_train.json").exists()
