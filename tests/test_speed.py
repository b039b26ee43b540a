"""Issue #8: the labelled-positions loss and padding-free batches give the plain loss exactly; bench output.

These check equality of losses and gradients, never speed (`derta bench` measures speed).
"""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from derta.data.recipes import RECIPES, RecipeConfig, build_rows
from derta.data.tokenize import label_token_shares, refusal_token_list, tokenize_row
from derta.models.precision import cpu_bf16_features
from derta.train import losses, run
from derta.train.collators import EpochRows, PackCollator, PadCollator
from derta.train.losses import batch_loss
from helpers import HELPFUL, TRIPLE

TOL = 1e-5


def recipe_rows(tokenizer, synthetic, recipe, n=3):
    cfg = RecipeConfig(recipe=recipe, seed=1)
    text_rows = build_rows(cfg, synthetic.harmful_train[:n], synthetic.helpful_train[:n])
    rows = []
    for r in text_rows:
        # RTO rows weigh 0.3: the weighting must survive both loss paths and packing.
        t = tokenize_row(r, tokenizer, "auto", "Sorry", 0.3)
        rows.append({**t, "kind": r["kind"]})
    return rows


def tiny_model(tiny_dir, lora=False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=4,
                lora_alpha=8,
                lora_dropout=0.0,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
                init_lora_weights=False,
            ),
        )
    return model


def loss_and_grads(model, batch, impl):
    model.zero_grad()
    loss, parts = batch_loss(model, batch, impl)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, parts


def max_diff(a, b):
    assert a[1].keys() == b[1].keys() and a[1]
    return max([float((a[0] - b[0]).abs())] + [float((a[1][k] - b[1][k]).abs().max()) for k in a[1]])


# The recipes whose rows train only tokens the tiny model has (backtracking's [RESET] needs a resized model; its rows
# are tested in test_backtrack, refusal tokens in test_refusal_tokens).
PLAIN_RECIPES = [
    r for r, x in RECIPES.items() if not refusal_token_list(build_rows(RecipeConfig(recipe=r), [TRIPLE], [HELPFUL]))
]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("recipe", PLAIN_RECIPES)
def test_chunked_loss_equals_full_logits_loss(tiny_dir, tiny_tokenizer, synthetic, monkeypatch, recipe, lora):
    rows = recipe_rows(tiny_tokenizer, synthetic, recipe)
    batch = PadCollator(tiny_tokenizer.pad_token_id)(rows)
    model = tiny_model(tiny_dir, lora)
    full = loss_and_grads(model, batch, "full")
    # Small chunks, so the per-chunk checkpointing is exercised more than once.
    monkeypatch.setattr(losses, "LOGITS_PER_CHUNK", 40 * len(tiny_tokenizer))
    chunked = loss_and_grads(model, batch, "chunked")
    assert max_diff(full, chunked) <= TOL
    for name in full[2]:
        assert full[2][name][1] == chunked[2][name][1]
        assert full[2][name][0] == pytest.approx(chunked[2][name][0], rel=1e-6)
    if "rto" in RECIPES[recipe].kinds:
        assert full[2]["rto"][1] > 0 and "rto_hit" in chunked[2]


@pytest.mark.parametrize("recipe", ["derta", "vanilla"])
def test_packed_batch_equals_padded_batch(tiny_dir, tiny_tokenizer, synthetic, recipe):
    rows = recipe_rows(tiny_tokenizer, synthetic, recipe)
    model = tiny_model(tiny_dir)
    padded = loss_and_grads(model, PadCollator(tiny_tokenizer.pad_token_id)(rows), "chunked")
    packed_batch = PackCollator()(rows)
    assert packed_batch["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    packed = loss_and_grads(model, packed_batch, "chunked")
    assert max_diff(padded, packed) <= TOL
    # Without the row boundaries (one long sequence) the loss differs: the test can fail.
    merged = dict(packed_batch, position_ids=torch.arange(packed_batch["input_ids"].shape[1])[None])
    assert float((batch_loss(model, merged)[0].detach() - padded[0]).abs()) > 1e-3


def test_pack_collator_cuts_labels_at_row_boundaries():
    rows = [
        {"input_ids": [5, 6, 7], "labels": [6, 6, 7], "kind": "helpful"},
        {"input_ids": [8, 9], "labels": [8, 9], "loss_weight": 0.5, "kind": "rto"},
    ]
    b = PackCollator()(rows)
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["loss_weight"].tolist() == [[1.0, 1.0, 1.0, 0.5, 0.5]]
    assert b["is_rto"].tolist() == [[False, False, False, True, True]]


def test_rto_positions_redrawn_each_epoch_and_reproducible():
    row = {"input_ids": list(range(60)), "labels": [-100] * 10 + [3] * 50, "kind": "rto", "loss_weight": 1.0}
    helpful = {"input_ids": list(range(20)), "labels": [-100] * 5 + [4] * 15, "kind": "helpful"}

    def kept(seed, epoch):
        ds = EpochRows([helpful, {**row, "rto_keep_ratio": 0.2}], seed=seed)
        ds.set_epoch(epoch)
        assert ds[0] is helpful
        return [j for j, x in enumerate(ds[1]["labels"]) if x != -100]

    assert len(kept(0, 0)) == 10 and all(j >= 10 for j in kept(0, 0))
    assert kept(0, 0) != kept(0, 1)
    assert kept(0, 1) == kept(0, 1)
    assert kept(0, 0) != kept(1, 0)
    assert row["labels"].count(3) == 50  # the row itself keeps every label
    shares = label_token_shares([helpful, {**row, "rto_keep_ratio": 0.2}], every_kind=True)
    assert shares == {"helpful": 0.6, "safe": 0.0, "prefix": 0.0, "rto": 0.4}


# ---------------------------------------------------------------- derta train: issue #7 flags and records


def write_rows(path, tokenizer, synthetic, recipe="derta", n=4):
    cfg = RecipeConfig(recipe=recipe, seed=1)
    rows = build_rows(cfg, synthetic.harmful_train[:n], synthetic.helpful_train[:n])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_train_records_dropped_rows_and_label_shares(tmp_path, tiny_dir, tiny_tokenizer, synthetic, capsys):
    from derta.cli.main import main

    data = write_rows(tmp_path / "rows.jsonl", tiny_tokenizer, synthetic)
    # One row whose answer starts after --max-length: dropped and counted.
    long_prompt = {"kind": "helpful", "instruction": "word " * 300, "prefix": "", "target": "the answer"}
    with data.open("a") as f:
        f.write(json.dumps(long_prompt) + "\n")
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--output",
                str(out),
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--grad-accum",
                "1",
                "--max-length",
                "200",
                "--rto-keep-ratio",
                "0.5",
                "--rto-weight",
                "0.5",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "dropped 1 rows" in err
    record = json.loads((out / "derta_train.json").read_text())
    assert record["dropped_rows"] == 1
    assert record["padding_free"] is True
    assert record["config"]["rto_keep_ratio"] == 0.5 and record["config"]["rto_weight"] == 0.5
    shares = record["label_shares"]
    assert set(shares) == {"helpful", "safe", "prefix", "rto"} and abs(sum(shares.values()) - 1) < 1e-3
    assert 0 < shares["rto"] < 1 and shares["safe"] == 0
    # The derta mix at full keep ratio is RTO-heavy: the warning fires only then.
    assert ("warning: RTO is" in err) == (shares["rto"] > 0.25)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rto-keep-ratio", "0"], "--rto-keep-ratio must be in (0, 1], not 0.0"),
        (["--rto-keep-ratio", "1.5"], "--rto-keep-ratio must be in (0, 1], not 1.5"),
        (["--rto-weight", "-1"], "--rto-weight must be a finite number >= 0, not -1.0"),
        (["--rto-weight", "nan"], "--rto-weight must be a finite number >= 0, not nan"),
    ],
)
def test_rto_flags_are_range_checked(tmp_path, tiny_dir, capsys, flags, message):
    from derta.cli.main import main

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"kind": "helpful", "instruction": "hi", "target": "ok"}) + "\n")
    assert main(["train", "--model", str(tiny_dir), "--data", str(data), "--output", str(tmp_path / "o"), *flags]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"derta: error: {message}"]


# ---------------------------------------------------------------- derta bench (tiny sizes: structure, not speed)


def test_bench_smoke_writes_json_and_table(tmp_path, tiny_dir):
    from derta.cli.main import main

    out = tmp_path / "bench"
    assert (
        main(
            [
                "bench",
                "--out",
                str(out),
                "--model",
                str(tiny_dir),
                "--batch",
                "2",
                "--seq",
                "32",
                "--steps",
                "1",
                "--pack-batches",
                "1",
                "--repeats",
                "1",
                "--short",
                "8-16",
                "--long",
                "24-40",
                "--prompts",
                "3",
                "--gen-batch",
                "3",
                "--max-new-tokens",
                "3",
                "--probe-pairs",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads((out / "bench.json").read_text())
    assert set(result["ratios"]) >= {"loss_peak_memory", "loss_step_time", "packing_tokens_per_s", "batched_generation"}
    assert all(v > 0 for v in result["ratios"].values())
    assert result["max_abs_loss_diff"] <= TOL
    assert result["packing"]["abs_loss_diff"] <= TOL
    assert result["probe"]["max_abs_probability_diff"] <= 1e-4
    for impl in ("full", "chunked"):
        assert result["loss"][impl]["peak_memory_mb"] >= 0 and result["loss"][impl]["step_s"] > 0
    assert result["packing"]["packed"]["positions_computed"] < result["packing"]["padded"]["positions_computed"]
    assert "| measure |" in (out / "bench.md").read_text()
    # The trunk part: LoRA on the top quarter, a later epoch from kept states, the same loss as recomputed.
    trunk = result["trunk"]
    assert (trunk["lora_layers"], trunk["layers"]) == (1, 4) and trunk["abs_loss_diff"] <= 1e-5
    assert trunk["cached"]["cache"]["used"] and trunk["cached"]["cache"]["batches"]["cached"] == 1
    assert "frozen trunk recomputed → kept from the first" in (out / "bench.md").read_text()
    assert {"trunk recomputed" in p["path"] for p in result["limit"]["paths"]} == {True, False}
    # The machine's limit: a peak per precision the hardware has, and each path's fraction of it well-formed.
    limit = result["limit"]
    assert set(limit["peak"]) == ({"float32", "bfloat16"} if cpu_bf16_features() else {"float32"})
    assert {"packed_bf16" in p["path"] for p in limit["paths"]} >= {bool(cpu_bf16_features())}
    for path in limit["paths"]:
        assert path["model_flops"] > 0 and path["peak_flops"] == limit["peak"][path["precision"]]["flops"]
        assert 0 < path["fraction_of_peak"] < 100 and math.isfinite(path["fraction_of_peak"])
    assert "| training path |" in (out / "bench.md").read_text()
    # Generation under bf16 autocast is timed where the CPU does bf16 in hardware, with its texts' agreement.
    generation = result["generation"]
    assert ("batched_bf16" in generation) == bool(cpu_bf16_features()) == ("bf16_generation" in result["ratios"])
    if cpu_bf16_features():
        assert 0 <= generation["bf16_same_text_share"] <= 1
        assert "batched float32 → bf16 autocast" in (out / "bench.md").read_text()


def test_grouped_fused_loss_path_equals_chunked(tiny_dir, tiny_tokenizer, synthetic, monkeypatch):
    """The CUDA fused-kernel path, with a plain-PyTorch stand-in for the kernel (same call signature)."""

    def reference_fused_ce(hidden, weight, targets, reduction="sum", softcap=None):
        assert reduction == "sum"
        return torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")

    batch = PadCollator(tiny_tokenizer.pad_token_id)(recipe_rows(tiny_tokenizer, synthetic, "derta"))
    model = tiny_model(tiny_dir)
    chunked = loss_and_grads(model, batch, "chunked")
    monkeypatch.setattr(losses, "_liger_function", lambda hidden, head: reference_fused_ce)
    fused = loss_and_grads(model, batch, "chunked")
    assert max_diff(chunked, fused) <= TOL
    for name in ("mle", "rto"):
        assert fused[2][name][1] == chunked[2][name][1]
        assert fused[2][name][0] == pytest.approx(chunked[2][name][0], rel=1e-6)


def test_unpackable_attention_falls_back_to_length_grouped_padding(
    tmp_path, tiny_dir, tiny_tokenizer, synthetic, monkeypatch
):
    from derta.cli.main import build_parser
    from derta.train.config import config_from_cli
    from derta.train.run import train

    seen = []
    original = PadCollator.__call__
    monkeypatch.setattr(PadCollator, "__call__", lambda self, rows: seen.append(len(rows)) or original(self, rows))
    monkeypatch.setattr(run, "PACKING_ATTENTION", ())  # as if the model's attention could not read packed rows
    data = write_rows(tmp_path / "rows.jsonl", tiny_tokenizer, synthetic)
    args = build_parser().parse_args(
        [
            "train",
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--output",
            str(tmp_path / "o"),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--quiet",
        ]
    )
    config = config_from_cli(args)
    out = train(config, str(tiny_dir), str(data))
    assert seen and config.train_sampling_strategy == "group_by_length"
    assert json.loads((out / "derta_train.json").read_text())["padding_free"] is False


def test_training_redraws_rto_positions_each_epoch(tmp_path, tiny_dir, tiny_tokenizer, synthetic, monkeypatch):
    """The epoch reaches the dataset inside a real Trainer run (accelerate's loader does not forward it)."""
    from derta.cli.main import main

    seen: dict = {}
    original = PackCollator.__call__

    def record(self, rows):
        for r in rows:
            if r["kind"] == "rto":
                seen.setdefault(tuple(r["input_ids"]), []).append([j for j, x in enumerate(r["labels"]) if x != -100])
        return original(self, rows)

    monkeypatch.setattr(PackCollator, "__call__", record)
    data = write_rows(tmp_path / "rows.jsonl", tiny_tokenizer, synthetic, n=2)
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--grad-accum",
                "1",
                "--rto-keep-ratio",
                "0.3",
                "--quiet",
            ]
        )
        == 0
    )
    assert seen and all(len(draws) == 2 for draws in seen.values())
    assert all(draws[0] != draws[1] for draws in seen.values())


def test_loss_impl_is_checked(tmp_path, tiny_dir, capsys):
    from derta.cli.main import main

    config = tmp_path / "train.yaml"
    config.write_text("loss_impl: fused\n")
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"kind": "helpful", "instruction": "hi", "target": "ok"}) + "\n")
    assert (
        main(
            [
                "train",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--output",
                str(tmp_path / "o"),
                "--config",
                str(config),
            ]
        )
        == 2
    )
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines == [f"derta: error: {config}: unknown loss_impl 'fused': use chunked or full"]


def test_chunked_loss_through_ddp_wrapper_equals_plain(tiny_dir, tiny_tokenizer, synthetic, tmp_path):
    """Inside DistributedDataParallel (one gloo process) the loss runs as the wrapper's forward; same loss and grads."""
    import torch.distributed as dist

    batch = PackCollator()(recipe_rows(tiny_tokenizer, synthetic, "derta"))
    model = tiny_model(tiny_dir)
    plain = loss_and_grads(model, batch, "chunked")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        calls = []
        wrapped.register_forward_pre_hook(lambda module, args: calls.append(1))
        through = loss_and_grads(wrapped, batch, "chunked")
    finally:
        dist.destroy_process_group()
    assert calls == [1] and "forward" not in vars(model)
    assert max(float((plain[1][k] - through[1]["module." + k]).abs().max()) for k in plain[1]) <= TOL
    assert abs(float(plain[0] - through[0])) <= TOL
