"""Circuit Breakers (train.circuit): the rerouting and retain losses, the schedule, the rows, a short LoRA run."""

import json
import math

import pytest
import torch

from derta.cli.main import main
from derta.data.recipes import RecipeConfig, build_rows
from derta.data.tokenize import IGNORE, tokenize_row
from derta.io import InputError
from derta.recipes.demo.config import DemoConfig
from derta.recipes.demo.pipeline import _lora_settings
from derta.train.circuit import cb_coefficients, massive_dims, parse_cb_layers, rerouting_loss, retain_loss
from helpers import HELPFUL, TRIPLE, write_jsonl


def test_rerouting_loss_is_zero_once_states_are_orthogonal_or_opposed_and_counts_only_masked_tokens():
    frozen = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]]])  # (layers 1, B 1, T 3, H 2)
    mask = torch.tensor([[True, True, False]])
    orthogonal = torch.tensor([[[[0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]]])  # third token identical but masked out
    assert rerouting_loss(orthogonal, frozen, mask)[0].item() == 0.0
    opposed = -frozen
    loss, cos = rerouting_loss(opposed, frozen, mask)
    assert loss.item() == 0.0 and cos == pytest.approx(-1.0)
    same = frozen * 5  # cosine ignores the scale
    assert rerouting_loss(same, frozen, mask)[0].item() == pytest.approx(1.0)
    half = torch.tensor([[[[1.0, 1.0], [0.0, -1.0], [0.0, 0.0]]]])  # cos 1/sqrt2 and -1: mean of ReLU = 0.3536
    assert rerouting_loss(half, frozen, mask)[0].item() == pytest.approx(0.5 / 2**0.5, abs=1e-6)


def test_rerouting_cosine_can_leave_out_massive_dimensions():
    # Dimension 0 is massive (RMS 100 against a median of ~1) and equal in both states: over every dimension the
    # states look aligned, without it they are orthogonal.
    frozen = torch.tensor([[[[100.0, 1.0, 0.0, 1.0], [100.0, 0.0, 1.0, 1.0]]]])
    live = torch.tensor([[[[100.0, -1.0, 0.0, 1.0], [100.0, 0.0, -1.0, 1.0]]]])
    mask = torch.tensor([[True, True]])
    assert massive_dims(frozen[:, mask], 10.0).tolist() == [[True, False, False, False]]
    assert rerouting_loss(live, frozen, mask)[1] > 0.99
    loss, cos = rerouting_loss(live, frozen, mask, skip_massive=10.0)
    assert cos == pytest.approx(0.0, abs=1e-6) and loss.item() == pytest.approx(0.0, abs=1e-6)
    # Without massive dimensions nothing is left out: the paper's cosine, to the bit.
    torch.manual_seed(0)
    plain = torch.randn(1, 2, 3, 8)
    moved = plain + 0.5 * torch.randn(1, 2, 3, 8)
    full = torch.ones(2, 3, dtype=torch.bool)
    assert rerouting_loss(moved, plain, full, 10.0)[0].item() == rerouting_loss(moved, plain, full)[0].item()


def test_retain_loss_is_zero_for_identical_states_and_the_mean_distance_otherwise():
    frozen = torch.randn(2, 3, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, False, False, False], [False] * 4])
    assert retain_loss(frozen.clone(), frozen, mask).item() == 0.0
    moved = frozen.clone()
    moved[..., 0] += 3.0  # every state 3 away, masked or not
    moved[:, 2] += 100.0  # far away, but on a row the mask leaves out
    assert retain_loss(moved, frozen, mask).item() == pytest.approx(3.0)


def test_schedule_runs_from_all_rerouting_to_an_even_split():
    assert cb_coefficients(0, 100, 10.0) == (10.0, 0.0)
    assert cb_coefficients(100, 100, 10.0) == pytest.approx((5.0, 5.0))
    assert cb_coefficients(50, 100, 4.0) == pytest.approx((3.0, 1.0))
    c_rr = [cb_coefficients(t, 100, 10.0)[0] for t in range(101)]
    assert all(a > b for a, b in zip(c_rr, c_rr[1:]))


def test_warmup_leaves_the_retain_weight_at_zero_then_joins_the_papers_schedule():
    warm = [cb_coefficients(t, 100, 10.0, warmup=20) for t in range(101)]
    assert all(c_retain == 0.0 for _, c_retain in warm[:20])
    assert warm[20:] == [cb_coefficients(t, 100, 10.0) for t in range(20, 101)]
    assert [c_rr for c_rr, _ in warm] == [cb_coefficients(t, 100, 10.0)[0] for t in range(101)]


def test_layers_auto_are_the_papers_depths_and_bad_layers_are_one_line():
    assert parse_cb_layers("auto", 32) == [10, 20]
    assert parse_cb_layers("auto", 4) == [1, 2] and parse_cb_layers("3, 1", 4) == [1, 3]
    assert parse_cb_layers("top:8", 30) == [24, 27] and parse_cb_layers("top:32", 32) == [10, 20]
    for bad in ("0", "5", "x", ",", "top:0", "top:5", "top:x"):
        with pytest.raises(InputError, match="--cb-layers"):
            parse_cb_layers(bad, 4)


def test_rows_reroute_the_harmful_response_and_keep_refusals_and_helpful_rows(tiny_tokenizer):
    rows = build_rows(RecipeConfig(recipe="circuit-breakers"), [TRIPLE], [HELPFUL])
    assert [r["kind"] for r in rows] == ["helpful", "safe", "reroute"]
    reroute = rows[2]
    assert reroute["target"] == TRIPLE["harmful_response"] and reroute["prefix"] == ""
    tok = tokenize_row(reroute, tiny_tokenizer)
    n = sum(x != IGNORE for x in tok["labels"])
    labelled = [t for t, x in zip(tok["input_ids"], tok["labels"]) if x != IGNORE]
    assert tiny_tokenizer.decode(labelled).startswith(TRIPLE["harmful_response"].split()[0]) and n > 3
    with pytest.raises(InputError, match="refusal-tokens"):
        RecipeConfig(recipe="circuit-breakers", refusal_tokens="single")


def _build_and_train(tmp_path, tiny_dir, synthetic, extra=()):
    tmp_path.mkdir(exist_ok=True)
    safety = write_jsonl(tmp_path / "s.jsonl", synthetic.harmful_train[:16])
    helpful = write_jsonl(tmp_path / "h.jsonl", synthetic.helpful_train[:16])
    rows = str(tmp_path / "rows.jsonl")
    build = ["data", "build", "--recipe", "circuit-breakers", "--safety", str(safety), "--helpful", str(helpful)]
    assert main([*build, "--out", rows]) == 0
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_dir), "--data", rows, "--output", str(out), "--max-steps", "30"]
    args += ["--batch-size", "8", "--grad-accum", "1", "--logging-steps", "5", "--quiet", "--learning-rate", "1e-2"]
    return main([*args, *extra]), out


def test_circuit_breaker_training_reroutes_harmful_states_and_needs_lora(tmp_path, tiny_dir, synthetic, capsys):
    code, _ = _build_and_train(tmp_path / "full", tiny_dir, synthetic)
    assert code == 2 and "add --lora" in capsys.readouterr().err
    code, _ = _build_and_train(
        tmp_path / "low", tiny_dir, synthetic, ["--lora", "--lora-layers", "1", "--cb-layers", "1"]
    )
    assert code == 2 and "cannot move" in capsys.readouterr().err  # layer 1 lies below the one adapted layer
    code, out = _build_and_train(
        tmp_path,
        tiny_dir,
        synthetic,
        ["--lora", "--lora-r", "8", "--cb-layers", "1,2", "--cb-warmup-steps", "10", "--cpu-bf16", "off"],
    )
    assert code == 0
    info = json.loads((out / "derta_train.json").read_text())
    assert info["trainer"] == "circuit-breakers" and info["rows"]["reroute"] == 16 and info["steps"] == 30
    log = info["log_history"]
    first, last = log[0], log[-1]
    # The rerouted states turn away from the frozen model's; the schedule moves the weight to retaining.
    assert last["reroute_loss"] < 0.5 * first["reroute_loss"] and last["reroute_cos"] < first["reroute_cos"]
    assert first["c_rr"] > last["c_rr"] and first["c_retain"] < last["c_retain"]
    assert info["config"]["cb_layers"] == "1,2" and info["config"]["cb_alpha"] == 10.0
    # --cb-warmup-steps: the rerouting alone for 10 steps, then the paper's retain weight (logged every 5 steps).
    retain_weight = {e["step"]: e["c_retain"] for e in log if "c_retain" in e}
    assert retain_weight[5] == 0.0 and retain_weight[10] == pytest.approx(10.0 * 10 / 60, abs=1e-3)
    assert info["config"]["cb_warmup_steps"] == 10
    assert info["cpu_bf16"] is False
    assert (out / "adapter_model.safetensors").exists()


def test_circuit_breakers_train_under_cpu_bf16_when_asked(tmp_path, tiny_dir, synthetic):
    code, out = _build_and_train(tmp_path, tiny_dir, synthetic, ["--lora", "--cb-layers", "1,2", "--cpu-bf16", "on"])
    assert code == 0
    info = json.loads((out / "derta_train.json").read_text())
    assert info["cpu_bf16"] is True and all(math.isfinite(e["reroute_cos"]) for e in info["log_history"][:-1])


def test_rerouting_a_model_tuned_on_its_top_layers_happens_within_them():
    real = DemoConfig(model="m", lora_r=16, lora_layers=8)
    after = _lora_settings(real, RecipeConfig(recipe="vanilla-circuit-breakers"))
    assert after["cb_layers"] == "top:8" and after["lora_layers"] is None
    assert "cb_layers" not in _lora_settings(real, RecipeConfig(recipe="circuit-breakers"))  # the paper's depths
    assert "cb_layers" not in _lora_settings(DemoConfig(), RecipeConfig(recipe="vanilla-circuit-breakers"))


def test_the_demo_reroutes_the_vanilla_model_for_vanilla_circuit_breakers(tmp_path, capsys):
    argv = ["demo", "--reduced", "--out", str(tmp_path / "d"), "--recipes"]
    assert main([*argv, "vanilla-circuit-breakers"]) == 2
    assert (
        "vanilla-circuit-breakers trains the vanilla model further: list vanilla before it" in capsys.readouterr().err
    )
    assert not (tmp_path / "d").exists()
    main([*argv, "vanilla,vanilla-circuit-breakers"])
    info = json.loads((tmp_path / "d" / "models" / "vanilla-circuit-breakers" / "derta_train.json").read_text())
    assert info["model"] == str(tmp_path / "d" / "models" / "vanilla") and info["trainer"] == "circuit-breakers"
    report = json.loads((tmp_path / "d" / "report.json").read_text())
    assert "vanilla-circuit-breakers" in report["models"]
