"""The frozen trunk's cache (train.trunk): with LoRA on the top layer only, later epochs run only that layer from
the states kept in the first, and the losses and trained weights equal those of the run that recomputes them."""

import json

import pytest
from safetensors.torch import load_file

from derta.cli.main import main
from derta.data.recipes import RecipeConfig, build_rows
from derta.models.loading import load_model
from derta.train import trunk
from derta.train.config import DertaConfig
from derta.train.run import _with_lora

ROWS = 12  # 3 packed batches of 4 per epoch


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory, synthetic):
    # RTO rows keep half their positions, re-drawn every epoch: the inputs repeat, the labels do not.
    rows = build_rows(
        RecipeConfig(recipe="derta", seed=1, rto_keep_ratio=0.5),
        synthetic.harmful_train[: ROWS // 2],
        synthetic.helpful_train[: ROWS // 2],
    )
    path = tmp_path_factory.mktemp("trunk") / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, len(rows)


def _train(tiny_dir, data, out, *flags):
    args = ["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(out), "--epochs", "3"]
    args += ["--batch-size", "4", "--grad-accum", "1", "--logging-steps", "1", "--learning-rate", "1e-3"]
    args += ["--lora", "--lora-layers", "1", "--lora-r", "4", "--lora-dropout", "0", "--quiet", *flags]
    assert main(args) == 0
    record = json.loads((out / "derta_train.json").read_text())
    return [h["loss"] for h in record["log_history"]], load_file(out / "adapter_model.safetensors"), record


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_cached_trunk_trains_as_the_recomputed_one(tiny_dir, rows_file, tmp_path, packed):
    data, n = rows_file
    (tmp_path / "layout.yaml").write_text(f"padding_free: {str(packed).lower()}\n")
    layout = ["--config", str(tmp_path / "layout.yaml")]
    plain_loss, plain_w, plain = _train(tiny_dir, data, tmp_path / "plain", "--trunk-cache-gb", "0", *layout)
    loss, weights, record = _train(tiny_dir, data, tmp_path / "cached", *layout)
    assert plain["trunk_cache"] == {"used": False, "off": "trunk_cache_gb 0"}
    cache = record["trunk_cache"]
    per_epoch = -(-n // 4)
    assert cache["used"] and cache["rows_kept"] == n and record["padding_free"] is packed
    assert cache["batches"] == {"computed": per_epoch, "cached": 2 * per_epoch}  # epochs 2 and 3 from the cache
    assert loss == pytest.approx(plain_loss, rel=1e-4)
    assert weights.keys() == plain_w.keys()
    for name, w in weights.items():
        # A row's kept states were computed beside other rows than this epoch's, so matmuls round differently,
        # and Adam scales the tiny gradient differences of near-zero gradients up to steps of the learning rate.
        assert (w - plain_w[name]).abs().max() <= 1e-2 * plain_w[name].abs().max(), name


def test_a_small_budget_keeps_what_fits_and_recomputes_the_rest(tiny_dir, rows_file, tmp_path):
    data, n = rows_file
    plain_loss, _, _ = _train(tiny_dir, data, tmp_path / "plain", "--trunk-cache-gb", "0")
    # Some rows fit, not all (tiny model: hidden 128 x float32 = 512 bytes a token, rows of ~20-100 tokens).
    loss, _, record = _train(tiny_dir, data, tmp_path / "small", "--trunk-cache-gb", str(1e5 / 2**30))
    cache = record["trunk_cache"]
    assert 0 < cache["rows_kept"] < n and cache["megabytes"] <= cache["budget_megabytes"]
    assert cache["batches"]["computed"] > -(-n // 4)
    assert loss == pytest.approx(plain_loss, rel=1e-4)


def test_the_cache_turns_itself_off_when_the_top_layers_disagree(tiny_dir, rows_file, tmp_path, monkeypatch):
    data, _ = rows_file
    plain_loss, _, _ = _train(tiny_dir, data, tmp_path / "plain", "--trunk-cache-gb", "0")

    class AllLayers:  # as if the model's forward ignored the swap: the kept states would pass every layer again
        def __init__(self, body, start):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(trunk, "_top_layers_only", AllLayers)
    loss, _, record = _train(tiny_dir, data, tmp_path / "broken")
    cache = record["trunk_cache"]
    assert not cache["used"] and cache["off"].startswith("the top layers from kept states differ")
    assert cache["rows_kept"] == 0 and cache["batches"]["cached"] == 0
    assert loss == pytest.approx(plain_loss, rel=1e-5)


def test_trunk_start_names_why_a_trunk_cannot_be_cached(tiny_dir):
    def lora(model, **kw):
        return _with_lora(model, DertaConfig(output_dir="unused", use_lora=True, lora_r=4, **kw))

    model = load_model(str(tiny_dir), dtype="float32")
    total = model.config.num_hidden_layers
    assert trunk.trunk_start(model) == (None, "the lowest decoder layer trains")  # full fine-tuning
    assert trunk.trunk_start(lora(load_model(str(tiny_dir), dtype="float32"), lora_layers=1)) == (total - 1, "")
    model = lora(load_model(str(tiny_dir), dtype="float32"), lora_layers=1)
    model.get_input_embeddings().weight.requires_grad_(True)  # as new refusal-token rows train
    assert trunk.trunk_start(model) == (None, "an embedding row or a layer below the trained ones trains")
    model = lora(load_model(str(tiny_dir), dtype="float32"), lora_layers=1)
    model.get_base_model().config.attention_dropout = 0.1
    assert trunk.trunk_start(model) == (None, "the frozen layers drop out at random")
