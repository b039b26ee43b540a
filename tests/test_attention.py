"""Row attention (train.attention): packed rows attended one by one give transformers' block-masked sdpa (loss,
gradients); every other batch (padding, generation with a KV cache) takes sdpa's own path unchanged."""

import json

import pytest
import torch

from derta.cli.main import main
from derta.train.attention import NAME, row_bounds, use_row_attention
from derta.train.collators import PackCollator, PadCollator
from test_speed import TOL, loss_and_grads, max_diff, recipe_rows, tiny_model, write_rows


def test_row_bounds_split_where_positions_restart():
    assert row_bounds(torch.tensor([0, 1, 2, 0, 1, 0])) == [0, 3, 5, 6]
    assert row_bounds(torch.tensor([0, 1, 2, 3])) == [0, 4]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_packed_rows_attended_one_by_one_equal_the_block_mask(tiny_dir, tiny_tokenizer, synthetic, monkeypatch, lora):
    rows = recipe_rows(tiny_tokenizer, synthetic, "derta")
    batch = PackCollator()(rows)
    model = tiny_model(tiny_dir, lora=lora)
    masked = loss_and_grads(model, batch, "chunked")
    padded = loss_and_grads(model, PadCollator(tiny_tokenizer.pad_token_id)(rows), "chunked")
    calls = []
    kernel = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or kernel(*a, **k)
    )
    assert use_row_attention(model.get_base_model() if lora else model)
    per_row = loss_and_grads(model, batch, "chunked")
    assert max_diff(masked, per_row) <= TOL and max_diff(padded, per_row) <= TOL
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * len(rows) and all(k["is_causal"] for k in calls)  # one causal call per row


def test_other_batches_take_sdpa_unchanged(tiny_dir, tiny_tokenizer, synthetic):
    rows = recipe_rows(tiny_tokenizer, synthetic, "derta")
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows)
    assert not bool(batch["attention_mask"].all())  # the rows differ in length: a real padding mask
    plain, switched = tiny_model(tiny_dir), tiny_model(tiny_dir)
    assert use_row_attention(switched) and switched.config._attn_implementation == NAME
    assert max_diff(loss_and_grads(plain, batch, "chunked"), loss_and_grads(switched, batch, "chunked")) <= TOL
    prompt = tiny_tokenizer(["a b c", "d e f g h i"], return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(plain.generate(**prompt, **kw), switched.generate(**prompt, **kw))


def test_only_sdpa_models_are_switched(tiny_dir):
    model = tiny_model(tiny_dir)
    model.set_attn_implementation("eager")
    assert not use_row_attention(model) and model.config._attn_implementation == "eager"


def test_train_records_row_attention_and_off_trains_the_same(tmp_path, tiny_dir, tiny_tokenizer, synthetic):
    data = write_rows(tmp_path / "rows.jsonl", tiny_tokenizer, synthetic)
    base = ["train", "--model", str(tiny_dir), "--data", str(data), "--max-steps", "3", "--batch-size", "4"]
    base += ["--grad-accum", "1", "--logging-steps", "1", "--quiet"]
    records = {}
    for setting in ("on", "off"):
        assert main([*base, "--out", str(tmp_path / setting), "--row-attention", setting]) == 0
        records[setting] = json.loads((tmp_path / setting / "derta_train.json").read_text())
    assert records["on"]["row_attention"] is True and records["off"]["row_attention"] is False
    assert records["on"]["config"]["row_attention"] is True and records["off"]["config"]["row_attention"] is False
    losses = {k: [h["loss"] for h in r["log_history"]] for k, r in records.items()}
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)
