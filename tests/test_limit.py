"""The machine's limit in `derta bench` (FLOP counting from the model, the matmul peak, well-formed fractions) and
CPU bf16 autocast in training and generation (off: the float32 run exactly; on: close to it).

Never timing thresholds: the counts are checked against the parameter shapes, the rates for being finite.
"""

import contextlib
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from derta.data.recipes import RecipeConfig, build_rows
from derta.inference import hf
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend
from derta.models.precision import cpu_bf16_features
from derta.recipes.limit import flop_profile, fraction_row, machine_peak, matmul_rate, step_flops
from derta.train import trainer as trainer_module
from derta.train.config import DertaConfig
from derta.train.run import _with_lora


def _linear_params(model, head):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)


def test_full_fine_tuning_counts_six_n_per_token(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    p = flop_profile(model)
    n_body = _linear_params(model, head)
    assert p["body_forward"] == 2 * n_body
    # Every weight trained and backprop reaches every layer (the embedding is trained): 2N + 2N backward.
    assert p["body_backward"] == 4 * n_body
    assert p["head_forward"] == 2 * head.weight.numel() and p["head_backward"] == 4 * head.weight.numel()
    assert p["attention_layers"] == p["attention_backprop_layers"] == model.config.num_hidden_layers
    assert all(q.grad is None for q in model.parameters())  # the probe forward leaves no gradient behind
    rows = [(10, 4), (6, 6)]
    d_q = model.config.hidden_size
    attention = 4 * (55 + 21) * d_q * 3 * model.config.num_hidden_layers
    assert step_flops(p, rows) == pytest.approx(16 * 6 * n_body + 10 * 6 * head.weight.numel() + attention)


def test_lora_on_top_layer_counts_no_backward_below(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    n_body = _linear_params(model, model.get_output_embeddings())
    layers = model.config.num_hidden_layers
    model = _with_lora(model, DertaConfig(output_dir="unused", use_lora=True, lora_r=4, lora_layers=1))
    p = flop_profile(model)
    lora = sum(q.numel() for q in model.parameters() if q.requires_grad)
    assert p["trained_params"] == lora
    # The frozen layers below the adapter run forward only; the frozen head passes the gradient back only.
    assert 2 * n_body < p["body_forward"] + p["body_backward"] < 4 * n_body
    assert p["attention_backprop_layers"] == 1 < layers == p["attention_layers"]
    assert p["head_backward"] == p["head_forward"]


def test_matmul_peak_and_fractions_are_well_formed():
    assert math.isfinite(matmul_rate(torch.float32, 64, repeats=1)) and matmul_rate(torch.float32, 64, 1) > 0
    peak = machine_peak(64, repeats=1, sizes=(128,))
    # bf16 is measured exactly when the CPU has it in hardware (detected, not assumed).
    assert set(peak) == ({"float32", "bfloat16"} if cpu_bf16_features() else {"float32"})
    for v in peak.values():
        assert v["flops"] == max(v["by_size"].values()) > 0
    row = fraction_row("x", 2e9, 0.5, "float32", peak)
    # the row rounds the fraction to 4 decimals
    assert row["achieved_flops"] == 4e9 and row["fraction_of_peak"] == pytest.approx(
        4e9 / peak["float32"]["flops"], abs=6e-5
    )


def _train(tiny_dir, data, out, *flags):
    from derta.cli.main import main

    argv = ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--max-steps", "2"]
    argv += ["--batch-size", "4", "--grad-accum", "1", "--learning-rate", "1e-3", "--logging-steps", "1", "--quiet"]
    assert main([*argv, *flags]) == 0
    return json.loads((out / "derta_train.json").read_text()), load_file(str(out / "model.safetensors"))


def test_cpu_bf16_off_is_the_float32_run_and_on_trains_close_to_it(tmp_path, tiny_dir, synthetic, monkeypatch):
    rows = build_rows(RecipeConfig(recipe="derta", seed=1), synthetic.harmful_train[:4], synthetic.helpful_train[:4])
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    off_info, off = _train(tiny_dir, data, tmp_path / "off", "--cpu-bf16", "off")
    on_info, on = _train(tiny_dir, data, tmp_path / "on", "--cpu-bf16", "on")
    # The code before CPU bf16 existed: no autocast at all.
    monkeypatch.setattr(trainer_module, "cpu_autocast", lambda enabled: contextlib.nullcontext())
    _, before = _train(tiny_dir, data, tmp_path / "before")
    assert (off_info["cpu_bf16"], on_info["cpu_bf16"]) == (False, True)
    assert off_info["cpu_bf16_features"] == cpu_bf16_features()
    assert all(torch.equal(off[k], before[k]) for k in off)
    lo, ln = ([h["loss"] for h in info["log_history"]] for info in (off_info, on_info))
    assert all(math.isfinite(x) for x in ln) and max(abs(a - b) / a for a, b in zip(lo, ln)) < 0.05, (lo, ln)
    assert any(not torch.equal(off[k], on[k]) for k in off)  # bf16 really ran
    assert max(float((off[k] - on[k]).abs().max()) for k in off) < 1e-2


def test_cpu_bf16_setting_is_checked(tmp_path, tiny_dir, capsys):
    from derta.cli.main import main

    config = tmp_path / "c.yaml"
    config.write_text("cpu_bf16: maybe\n")
    argv = ["train", "--model", str(tiny_dir), "--data", "x.jsonl", "--output", str(tmp_path / "o"), "--config"]
    assert main([*argv, str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown cpu_bf16 'maybe'" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_generation_off_is_unchanged_and_on_generates(tiny_dir, tiny_tokenizer, synthetic, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    inputs = [GenInput(r["instruction"]) for r in synthetic.harmful_test[:3] + synthetic.helpful_test[:3]]
    off = HFBackend(model, tiny_tokenizer, batch_size=3, max_new_tokens=6, cpu_bf16="off")
    on = HFBackend(model, tiny_tokenizer, batch_size=3, max_new_tokens=6, cpu_bf16="on")
    assert (off.cpu_bf16, on.cpu_bf16) == (False, True)
    texts_off, texts_on = off.generate(inputs), on.generate(inputs)
    monkeypatch.setattr(hf, "cpu_autocast", lambda enabled: contextlib.nullcontext())
    assert off.generate(inputs) == texts_off  # greedy float32 output as without the autocast code
    assert len(texts_on) == len(inputs) and all(isinstance(t, str) for t in texts_on)
