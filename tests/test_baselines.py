"""The baselines next to DeRTa (docs/baselines.md): Qi et al.'s safety recovery rows and token-wise
constrained objective, and DPO on the same safety triples."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from derta.cli.main import main
from derta.data.recipes import RECOVERY_MAX_PREFIX, RecipeConfig, build_rows, word_cut
from derta.data.tokenize import IGNORE, tokenize_row
from derta.models.templates import encode_prompt, encode_text, format_prompt
from derta.train.collators import PackCollator, PadCollator
from derta.train.losses import _ranks_in_row, batch_loss, constraint_betas, constraint_weights
from helpers import HELPFUL, TRIPLE, trained, write_jsonl

# ---------------------------------------------------------------- recovery (Qi et al.'s data augmentation)


def test_recovery_rows_put_a_harmful_prefix_of_1_to_100_words_on_half_the_triples():
    long = dict(TRIPLE, harmful_response=" ".join(f"step{i} [tool]." for i in range(150)))  # 300 words
    safety = [TRIPLE] * 40 + [long] * 40
    rows = build_rows(RecipeConfig(recipe="recovery", seed=7), safety, [HELPFUL] * 3)
    assert [r["kind"] for r in rows] == ["helpful"] * 3 + ["prefix"] * 80
    recovery = rows[3:]
    with_prefix = [(t, r) for t, r in zip(safety, recovery) if r["prefix"]]
    assert len(with_prefix) == 40  # exactly half
    ks = []
    for t, r in with_prefix:
        k = len(r["prefix"].split())
        assert 1 <= k <= min(RECOVERY_MAX_PREFIX, len(t["harmful_response"].split()))
        assert r["prefix"] == word_cut(t["harmful_response"], k) and r["target"] == TRIPLE["safe_response"]
        ks.append((len(t["harmful_response"].split()), k))
    # The short response may be given whole (k = |r|, unlike the prefix recipe's k < |r|); the long one is capped at 100.
    assert max(k for n, k in ks if n > RECOVERY_MAX_PREFIX) > 50
    assert all(k <= RECOVERY_MAX_PREFIX for _, k in ks)
    # Same seed, same rows; another seed, other rows.
    assert build_rows(RecipeConfig(recipe="recovery", seed=7), safety, []) == recovery
    assert build_rows(RecipeConfig(recipe="recovery", seed=8), safety, []) != recovery


def test_recovery_labels_train_only_the_refusal_after_the_prefix(tiny_tokenizer):
    rows = build_rows(RecipeConfig(recipe="recovery", seed=0), [TRIPLE] * 8, [])
    with_prefix = [r for r in rows if r["prefix"]]
    without = [r for r in rows if not r["prefix"]]
    assert with_prefix and without
    prompt = encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, TRIPLE["instruction"]))
    eos = tiny_tokenizer.eos_token_id
    for r in with_prefix:
        tok = tokenize_row(r, tiny_tokenizer)
        prefix = encode_text(tiny_tokenizer, r["prefix"])
        refusal = encode_text(tiny_tokenizer, " " + TRIPLE["safe_response"])  # the mid form " Sorry, ..."
        assert tok["input_ids"] == prompt + prefix + refusal + [eos]
        # No loss on the prompt or on any harmful token: only on the refusal and the end of turn.
        assert tok["labels"] == [IGNORE] * (len(prompt) + len(prefix)) + refusal + [eos]
        assert tiny_tokenizer.convert_ids_to_tokens(trained(tok)[0]) == "ĠSorry"
    for r in without:
        tok = tokenize_row(r, tiny_tokenizer)
        assert tiny_tokenizer.decode(trained(tok)[:-1]) == TRIPLE["safe_response"]
        assert tok["labels"][: len(prompt)] == [IGNORE] * len(prompt)


def test_data_build_reports_the_recovery_mix(tmp_path, capsys):
    safety = write_jsonl(tmp_path / "s.jsonl", [TRIPLE] * 5)
    helpful = write_jsonl(tmp_path / "h.jsonl", [HELPFUL] * 20)
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "recovery",
                "--safety",
                str(safety),
                "--helpful",
                str(helpful),
                "--out",
                str(tmp_path / "r.jsonl"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "helpful:safety rows 4.0:1" in out and "Qi et al." in out


# ---------------------------------------------------------------- DPO data


def test_dpo_rows_pair_the_safe_response_with_the_harmful_one(tiny_tokenizer):
    rows = build_rows(RecipeConfig(recipe="dpo"), [TRIPLE] * 2, [HELPFUL])
    assert [r["kind"] for r in rows] == ["helpful", "pair", "pair"]
    pair = rows[1]
    assert (pair["target"], pair["rejected"], pair["prefix"]) == (
        TRIPLE["safe_response"],
        TRIPLE["harmful_response"],
        "",
    )
    tok = tokenize_row(pair, tiny_tokenizer)
    prompt = encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, TRIPLE["instruction"]))
    eos = tiny_tokenizer.eos_token_id
    chosen = encode_text(tiny_tokenizer, TRIPLE["safe_response"])
    rejected = encode_text(tiny_tokenizer, TRIPLE["harmful_response"])
    # Both sides follow the same prompt and end with the end of turn; only the responses are trained.
    assert tok["input_ids"] == prompt + chosen + [eos] and tok["rejected_input_ids"] == prompt + rejected + [eos]
    assert tok["labels"] == [IGNORE] * len(prompt) + chosen + [eos]
    assert tok["rejected_labels"] == [IGNORE] * len(prompt) + rejected + [eos]


# ---------------------------------------------------------------- the token-wise constrained objective


def test_constraint_beta_schedule_is_qi_et_al():
    betas = constraint_betas(torch.arange(8), 0.1)
    assert torch.allclose(betas, torch.tensor([0.5, 2, 2, 2, 2, 0.1, 0.1, 0.1]))


def test_constraint_weight_is_one_at_beta_zero_and_grows_with_distance():
    nll = torch.full((5,), 2.0)
    ref = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.0])  # the reference ever more likely than the model on the target
    assert torch.equal(constraint_weights(nll, ref, torch.zeros(5)), torch.ones(5))
    w = constraint_weights(nll, ref, torch.full((5,), 0.5))
    assert torch.all(w[1:] > w[:-1]) and abs(float(w[1]) - 1.0) < 1e-7 and float(w.max()) < 2.0
    # Where the model is already far above the reference the weight fades, but never below Qi et al.'s 1e-3 floor.
    assert float(constraint_weights(torch.tensor([0.0]), torch.tensor([100.0]), torch.tensor([2.0]))) == pytest.approx(
        1e-3
    )


def test_token_ranks_restart_at_every_row_packed_or_padded():
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [IGNORE, IGNORE, 7, 8], "kind": "safe"},
        {"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "kind": "helpful"},
    ]
    for batch in (PadCollator(0)(rows), PackCollator()(rows)):
        mask = batch["labels"][:, 1:].ne(IGNORE)
        assert _ranks_in_row(batch, mask).tolist() == [0, 1, 0, 1]


def _rows(tokenizer, synthetic):
    text = build_rows(RecipeConfig(recipe="derta", seed=1), synthetic.harmful_train[:3], synthetic.helpful_train[:3])
    return [{**tokenize_row(r, tokenizer), "kind": r["kind"]} for r in text]


def _model(tiny_dir, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


def _loss_and_grads(model, batch, **kw):
    model.zero_grad()
    loss, parts = batch_loss(model, batch, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, parts


@pytest.mark.parametrize("collate", ["pad", "pack"])
def test_constrained_loss_tends_to_cross_entropy_as_beta_goes_to_zero(tiny_dir, tiny_tokenizer, synthetic, collate):
    rows = _rows(tiny_tokenizer, synthetic)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows) if collate == "pad" else PackCollator()(rows)
    model, reference = _model(tiny_dir), _model(tiny_dir)
    with torch.no_grad():  # a reference that differs from the model
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = _loss_and_grads(model, batch)
    gaps = []
    for beta in (1.0, 1e-2, 1e-4, 0.0):
        constrained = _loss_and_grads(model, batch, reference=reference, constraint_beta=beta)
        gaps.append(
            max(
                [float((constrained[0] - plain[0]).abs())]
                + [float((constrained[1][k] - plain[1][k]).abs().max()) for k in plain[1]]
            )
        )
    # The gap shrinks with beta (about linearly) and is exactly 0 at beta = 0: the weights are then all 1.
    assert gaps[0] > 1e-2 and gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 and gaps[3] == 0.0


def test_constrained_loss_grows_with_distance_to_the_reference(tiny_dir, tiny_tokenizer, synthetic):
    batch = PackCollator()(_rows(tiny_tokenizer, synthetic))
    model = _model(tiny_dir)

    def reference_ahead(steps):
        # A reference that has learned these targets `steps` SGD steps further than the model.
        ref = _model(tiny_dir)
        opt = torch.optim.SGD(ref.parameters(), lr=0.05)  # small enough to descend
        for _ in range(steps):
            opt.zero_grad()
            batch_loss(ref, batch)[0].backward()
            opt.step()
        return ref

    references = [reference_ahead(s) for s in (0, 2, 10)]
    with torch.no_grad():
        plain = float(batch_loss(model, batch)[0])
        losses = [float(batch_loss(model, batch, reference=r, constraint_beta=0.1)[0]) for r in references]
    assert losses[0] == pytest.approx(plain, abs=1e-6)  # reference = the model itself: plain cross-entropy
    assert plain < losses[1] < losses[2] < 2 * plain


def test_train_with_constrain_to_runs_and_logs_the_constraint(tmp_path, tiny_dir, synthetic, capsys):
    safety = write_jsonl(tmp_path / "s.jsonl", synthetic.harmful_train[:8])
    helpful = write_jsonl(tmp_path / "h.jsonl", synthetic.helpful_train[:8])
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "recovery",
                "--safety",
                str(safety),
                "--helpful",
                str(helpful),
                "--out",
                str(tmp_path / "rows.jsonl"),
            ]
        )
        == 0
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(tmp_path / "rows.jsonl"),
                "--output",
                str(out),
                "--max-steps",
                "4",
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
                "--learning-rate",
                "1e-2",
                "--logging-steps",
                "2",
                "--quiet",
                "--constrain-to",
                str(tiny_dir),
                "--constraint-beta",
                "0.2",
            ]
        )
        == 0
    )
    info = json.loads((out / "derta_train.json").read_text())
    assert info["config"]["constrain_to"] == str(tiny_dir) and info["config"]["constraint_beta"] == 0.2
    # At the first log the model has barely moved from its reference: weights near 1, and between Qi's bounds.
    weights = [h["constraint_weight"] for h in info["log_history"]]
    assert len(weights) == 2 and all(1e-3 <= w <= 2.0 for w in weights)


def test_constraint_settings_are_checked(tmp_path, tiny_dir, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "helpful", "instruction": "hi", "target": "hello"}])
    base = ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "o"), "--max-steps", "1"]
    assert main(base + ["--constrain-to", str(tiny_dir), "--constraint-beta", "-1"]) == 2
    assert "--constraint-beta must be a finite number >= 0" in capsys.readouterr().err
    other = tmp_path / "other"
    from derta.models.tiny import build_tiny

    build_tiny(other, seed=0, vocab_size=1024, hidden_size=32, layers=1)
    assert main(base + ["--constrain-to", str(other)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("derta: error")]
    assert len(err) == 1 and "reference model's vocabulary (1024) is not the model's (2048)" in err[0]


# ---------------------------------------------------------------- DPO training (TRL's DPOTrainer)


def test_dpo_examples_for_trl_keep_derta_tokenization(tiny_tokenizer):
    from derta.train.config import DertaConfig
    from derta.train.dpo import dpo_examples

    rows = build_rows(RecipeConfig(recipe="dpo"), [TRIPLE], [HELPFUL])
    config = DertaConfig(output_dir="unused")
    helpful, pair = dpo_examples(rows, tiny_tokenizer, config)
    tok = tokenize_row(rows[1], tiny_tokenizer)
    n = len(encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, TRIPLE["instruction"])))
    assert pair["prompt_ids"] == tok["input_ids"][:n]
    assert pair["chosen_ids"] == tok["input_ids"][n:] and pair["rejected_ids"] == tok["rejected_input_ids"][n:]
    assert tiny_tokenizer.decode(pair["chosen_ids"][:-1]) == TRIPLE["safe_response"]
    assert tiny_tokenizer.decode(pair["rejected_ids"][:-1]) == TRIPLE["harmful_response"]
    # Helpful rows: chosen = rejected, so DPO's margin is 0 and only the SFT term trains them.
    assert (
        helpful["chosen_ids"] == helpful["rejected_ids"]
        and tiny_tokenizer.decode(helpful["chosen_ids"][:-1]) == HELPFUL["response"]
    )
    # Rows built with --tokenizer give the same examples as text rows.
    tokenized = [{**r, **tokenize_row(r, tiny_tokenizer)} for r in rows]
    assert dpo_examples(tokenized, tiny_tokenizer, config) == [helpful, pair]
    with pytest.raises(Exception, match="pair and helpful rows"):
        dpo_examples([{"kind": "rto", "instruction": "q", "prefix": "", "target": "t"}], tiny_tokenizer, config)


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_training_prefers_the_refusal(tmp_path, tiny_dir, tiny_tokenizer, synthetic, lora):
    from derta.models.loading import load_model
    from derta.train.config import DertaConfig
    from derta.train.dpo import dpo_examples

    safety = write_jsonl(tmp_path / "s.jsonl", synthetic.harmful_train[:16])
    helpful = write_jsonl(tmp_path / "h.jsonl", synthetic.helpful_train[:16])
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "dpo",
                "--safety",
                str(safety),
                "--helpful",
                str(helpful),
                "--out",
                str(tmp_path / "rows.jsonl"),
            ]
        )
        == 0
    )
    out = tmp_path / "out"
    extra = ["--lora", "--lora-r", "8", "--merge", "--learning-rate", "5e-3"] if lora else ["--learning-rate", "2e-3"]
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(tmp_path / "rows.jsonl"),
                "--output",
                str(out),
                "--max-steps",
                "20",
                "--batch-size",
                "8",
                "--grad-accum",
                "1",
                "--logging-steps",
                "5",
                "--quiet",
                "--dpo-beta",
                "0.2",
                *extra,
            ]
        )
        == 0
    )
    info = json.loads((out / "derta_train.json").read_text())
    assert info["trainer"] == "dpo" and info["rows"]["pair"] == 16 and info["rows"]["helpful"] == 16
    assert info["config"]["dpo_beta"] == 0.2 and info["steps"] == 20
    assert (out / "model.safetensors").exists()

    def margin(model_dir):
        # log p(chosen) - log p(rejected) summed over the safety pairs: DPO must raise it.
        model = load_model(str(model_dir))
        rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
        total = 0.0
        for ex in dpo_examples([r for r in rows if r["kind"] == "pair"], tiny_tokenizer, DertaConfig(output_dir="x")):
            for side, sign in (("chosen_ids", 1), ("rejected_ids", -1)):
                ids = torch.tensor([ex["prompt_ids"] + ex[side]])
                with torch.no_grad():
                    logp = model(ids).logits[0, :-1].log_softmax(-1)
                n = len(ex["prompt_ids"])
                total += sign * float(logp[n - 1 :].gather(1, ids[0, n:, None]).sum())
        return total

    assert margin(out) > margin(tiny_dir) + 10
