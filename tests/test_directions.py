"""Harmfulness and refusal directions: positions, batched hidden states, the fit and the layer choice, the command,
the scores along a response with the refusal cliff, the latent guard and the prompt-only refusal predictor."""

import json

import numpy as np
import pytest

from derta.cli.main import main
from derta.eval.directions import (
    auroc,
    fit_directions,
    hidden_states,
    load_directions,
    position_scores,
    prompt_features,
    prompt_positions,
    scorer,
)
from derta.eval.latent import prompt_only, tfidf
from derta.io import InputError
from derta.models.loading import load_model
from helpers import write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir)).eval()


@pytest.fixture(scope="module")
def fitted(tiny_dir, synthetic, tmp_path_factory):
    """`derta directions` on the tiny model, with guard prompts: (output directory, its files)."""
    tmp = tmp_path_factory.mktemp("directions")
    files = {
        "harmful": write_jsonl(tmp / "harmful.jsonl", synthetic.harmful_test[:16]),
        "harmless": write_jsonl(tmp / "harmless.jsonl", synthetic.helpful_test[:16]),
        "guard_harmful": write_jsonl(tmp / "guard_harmful.jsonl", synthetic.harmful_test[16:26]),
        "guard_safe": write_jsonl(tmp / "guard_safe.jsonl", synthetic.helpful_test[16:26]),
    }
    out = tmp / "dirs"
    args = ["directions", "--model", str(tiny_dir), "--out", str(out), "--guard-max-new-tokens", "4"]
    for name, path in files.items():
        args += ["--" + name.replace("_", "-"), str(path)]
    assert main(args) == 0
    return out, files


def test_prompt_positions_split_instruction_and_post_instruction_tokens(tiny_tokenizer):
    ids, start, end = prompt_positions(tiny_tokenizer, "Repeat these words: apple river blue", "chat")
    assert tiny_tokenizer.decode(ids[start:end]).strip() == "Repeat these words: apple river blue"
    assert "<|assistant|>" in tiny_tokenizer.decode(ids[end:]) and "<|user|>" in tiny_tokenizer.decode(ids[:start])
    ids, start, end = prompt_positions(tiny_tokenizer, "What is the first word?", "inst")
    assert "first word?" in tiny_tokenizer.decode(ids[start:end]) and "INST" in tiny_tokenizer.decode(ids[end:])
    with pytest.raises(InputError, match="no tokens after the instruction"):
        prompt_positions(tiny_tokenizer, "What is the first word?", "raw")


def test_batched_hidden_states_equal_one_at_a_time(tiny_model, tiny_tokenizer, synthetic):
    prompts = [r["instruction"] for r in synthetic.harmful_test[:3] + synthetic.helpful_test[:4]]
    one = prompt_features(tiny_model, tiny_tokenizer, prompts, batch_size=1)
    many = prompt_features(tiny_model, tiny_tokenizer, prompts, batch_size=5)
    for kind in one:
        assert one[kind].shape == (7, tiny_model.config.num_hidden_layers, tiny_model.config.hidden_size)
        assert np.allclose(one[kind], many[kind], atol=1e-4)
    seqs = [[1, 5, 6], [1, 7]]
    lengths = {i: h.shape[1] for i, h in hidden_states(tiny_model, tiny_tokenizer, seqs, batch_size=2)}
    assert lengths == {0: 3, 1: 2}


def planted(n: int = 40, layers: int = 4, width: int = 16, layer: int = 2, seed: int = 0):
    """Features where only `layer` separates the classes, along a known direction."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, layers, width))
    direction = np.zeros(width)
    direction[3] = 1.0
    x[:n, layer] += 4 * direction
    return x, direction


def test_fit_finds_the_planted_layer_and_direction():
    x, direction = planted()
    tensors, summary = fit_directions({"harmfulness": x, "refusal": x[:, ::-1]}, 40, 40, 0.3, seed=0)
    assert summary["chosen_layer"] == {"harmfulness": 3, "refusal": 2}  # counted from 1; reversed layers for refusal
    assert summary["n_train"] + summary["n_heldout"] == 80 and summary["n_heldout"] == 24
    h = summary["heldout"]["harmfulness"]
    assert h["accuracy"] > 0.95 and h["probe_accuracy"] > 0.9 and h["auroc"] > 0.99
    others = [r["accuracy"] for r in summary["layers"]["harmfulness"] if r["layer"] != 3]
    assert max(others) < 0.8, others
    assert float(tensors["harmfulness.direction"][2] @ direction) > 0.9
    assert np.allclose(np.linalg.norm(tensors["harmfulness.direction"], axis=1), 1.0, atol=1e-5)
    # Scores put the harmful training mean at 1 and the harmless one at 0 (the split is the fit's own).
    layer, score = scorer(tensors, summary, "harmfulness")
    s = score(x)
    assert layer == 3 and 0.8 < s[:40].mean() < 1.2 and -0.2 < s[40:].mean() < 0.2


def test_auroc_hand_examples():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5 and auroc([2], [2]) == 0.5


def test_cli_directions_writes_tensors_and_report(fitted, tiny_model):
    out, files = fitted
    tensors, info = load_directions(out)
    layers, width = tiny_model.config.num_hidden_layers, tiny_model.config.hidden_size
    for kind in ("harmfulness", "refusal"):
        assert tensors[f"{kind}.direction"].shape == (layers, width)
        assert tensors[f"{kind}.probe_weight"].shape == (layers, width)
        assert 1 <= info["chosen_layer"][kind] <= layers and len(info["layers"][kind]) == layers
    assert info["harmful"]["n"] == 16 and info["settings"]["seed"] == 0 and len(info["harmful"]["sha256"]) == 64
    g = info["guard"]
    assert g["n_harmful"] == 10 and g["n_safe"] == 10 and 0.0 <= g["harmfulness"]["auroc"] <= 1.0
    assert g["model"]["refuses_harmful"]["n"] == 10 and "prompt_only" in g
    rows = [json.loads(line) for line in (out / "guard.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and {"harmfulness", "refusal", "refused"} <= set(rows[0])
    flagged = np.mean([r["harmfulness"] > 0.5 for r in rows if r["set"] == "harmful"])
    assert flagged == pytest.approx(g["harmfulness"]["flags_harmful"]["rate"])
    assert not any(isinstance(v, str) and len(v) > 20 for r in rows for v in r.values()), "no text is kept"


def test_training_prompts_score_one_and_zero_on_average(fitted, tiny_model, tiny_tokenizer, synthetic):
    out, _ = fitted
    tensors, info = load_directions(out)
    prompts = [r["instruction"] for r in synthetic.harmful_test[:16] + synthetic.helpful_test[:16]]
    feats = prompt_features(tiny_model, tiny_tokenizer, prompts)
    s = scorer(tensors, info, "harmfulness")[1](feats["harmfulness"])
    # Over all 32 prompts (training and held-out), harmful ones near 1 and harmless ones near 0.
    assert s[:16].mean() > 0.6 and s[16:].mean() < 0.4
    # The same score read along a sequence: at the instruction's last token it is the prompt's feature score.
    rows = position_scores(tiny_model, tiny_tokenizer, [(prompts[0], "Sure, here is")], tensors, info)
    n = rows[0]["prompt_tokens"]
    _, start, end = prompt_positions(tiny_tokenizer, prompts[0], "chat")
    assert rows[0]["harmfulness"][end - start - 1] == pytest.approx(float(s[0]), abs=1e-3)
    assert rows[0]["cliff"] == pytest.approx(max(rows[0]["refusal"]) - rows[0]["refusal"][-1], abs=1e-4)
    assert len(rows[0]["refusal"]) == n + len(tiny_tokenizer("Sure, here is", add_special_tokens=False)["input_ids"])


def test_cli_probe_with_directions_several_models(fitted, tiny_dir, synthetic, tmp_path):
    out, _ = fitted
    data = write_jsonl(tmp_path / "harmful.jsonl", synthetic.harmful_test[30:34])
    twin = tmp_path / "twin"
    twin.symlink_to(tiny_dir)
    probe_out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    args = ["probe", "--model", str(tiny_dir), str(twin), "--data", str(data), "--out", str(probe_out)]
    assert main(args + ["--plot", str(png), "--directions", str(out), "--points", "5"]) == 0
    result = json.loads(probe_out.read_text())
    a, b = result["models"]
    assert a["inside"]["cliff"] == b["inside"]["cliff"] and a["curve"] == b["curve"]  # same weights, same numbers
    inside = a["inside"]
    xs = [c["position_frac"] for c in inside["score_curve"]]
    assert xs[0] == -1.0 and xs[-1] == 1.0 and 0.0 in xs and len(xs) == 9
    cliffs = [r["cliff"] for r in inside["per_example_scores"]]
    assert all(c >= 0 for c in cliffs) and inside["cliff"]["mean"] == pytest.approx(np.mean(cliffs), abs=1e-6)
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_probe_directions_of_another_shape_and_guard_leak_are_one_line(
    fitted, tiny_dir, synthetic, tmp_path, capsys
):
    out, files = fitted
    tensors, info = load_directions(out)
    other = tmp_path / "other"
    from derta.eval.directions import save_directions

    save_directions(other, {k: v[:, :5] if v.ndim == 2 else v for k, v in tensors.items()}, info)
    data = write_jsonl(tmp_path / "harmful.jsonl", synthetic.harmful_test[:2])
    capsys.readouterr()
    args = ["probe", "--model", str(tiny_dir), "--data", str(data), "--out", str(tmp_path / "p.json")]
    assert main(args + ["--directions", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "width 5" in err[0]
    leak = ["directions", "--model", str(tiny_dir), "--harmful", str(files["harmful"]), "--out", str(tmp_path / "d")]
    leak += ["--harmless", str(files["harmless"]), "--guard-harmful", str(files["harmful"])]
    assert main(leak + ["--guard-safe", str(files["guard_safe"])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guard must be held out" in err[0]
    assert main(leak) == 2 and "go together" in capsys.readouterr().err


def test_tfidf_and_prompt_only_predictor_learn_a_word():
    xtr, xte = tfidf(["alpha beta", "beta gamma"], ["alpha", "delta"])
    assert xtr.shape[0] == 2 and np.allclose(np.linalg.norm(xtr, axis=1), 1.0) and not xte[1].any()
    rng = np.random.default_rng(0)
    words = ["river", "apple", "blue", "city", "house", "story"]
    prompts, refused = [], []
    for k in range(60):
        refuse = k % 2 == 0
        filler = " ".join(rng.choice(words, 3))
        prompts.append(f"{'forbidden' if refuse else 'friendly'} {filler}")
        refused.append(refuse)
    guard = rng.normal(size=60)
    r = prompt_only(prompts, refused, guard, 0.3, seed=0)
    assert r["accuracy"] == 1.0 and r["auroc"] == 1.0 and r["n_heldout"] == 18
    assert r["majority_accuracy"] == 0.5 and 0.0 <= r["guard_auroc"] <= 1.0
    assert "skipped" in prompt_only(prompts, [True] * 60, guard, 0.3, seed=0)


def test_data_build_select_by_cliff_keeps_the_largest_cliffs(
    fitted, tiny_dir, tiny_model, tiny_tokenizer, synthetic, tmp_path, capsys
):
    out, _ = fitted
    triples = synthetic.harmful_train[:8]
    safety = write_jsonl(tmp_path / "safety.jsonl", triples)
    built = tmp_path / "built.jsonl"
    args = ["data", "build", "--recipe", "vanilla", "--safety", str(safety), "--out", str(built)]
    assert main(args + ["--select-by-cliff", "0.25"]) == 2
    assert "needs --cliff-model and --cliff-directions" in capsys.readouterr().err
    args += ["--select-by-cliff", "0.25", "--cliff-model", str(tiny_dir), "--cliff-directions", str(out)]
    assert main(args) == 0
    report = json.loads((tmp_path / "built.cliff.json").read_text())
    tensors, info = load_directions(out)
    pairs = [(r["instruction"], r["harmful_response"]) for r in triples]
    cliffs = [r["cliff"] for r in position_scores(tiny_model, tiny_tokenizer, pairs, tensors, info)]
    assert report["cliffs"] == pytest.approx(cliffs, abs=1e-4) and report["kept"] == 2 and report["n"] == 8
    top = sorted(range(8), key=lambda i: -cliffs[i])[:2]
    rows = [json.loads(line) for line in built.read_text().splitlines()]
    assert sorted({r["instruction"] for r in rows}) == sorted(triples[i]["instruction"] for i in top)
    assert report["mean_kept_cliff"] >= report["mean_cliff"]
