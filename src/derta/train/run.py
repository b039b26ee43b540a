"""`derta train`: fine-tune a model on `data build` rows and save it with its log (derta_train.json).

Rows with DPO pairs are trained with TRL's DPOTrainer, all others with DertaTrainer. Batches are padding-free
by default: the rows of a batch are packed into one sequence whose position_ids restart per row.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PrinterCallback, ProgressCallback, set_seed
from transformers.trainer_utils import get_last_checkpoint

from derta.data.recipes import KINDS
from derta.data.tokenize import (
    IGNORE,
    RTO_SHARE_WARN,
    label_token_shares,
    load_training_rows,
    refusal_token_list,
    tokenize_row,
)
from derta.files import compare_manifest, fingerprints, lock_dir
from derta.io import InputError, json_text, loads, read_text, show_progress, write_json
from derta.models.loading import check_model_files, describe_nonfinite, load_model, load_tokenizer, nonfinite_tensors
from derta.models.precision import cpu_bf16_features
from derta.models.refusal_tokens import add_special_tokens, init_new_embeddings
from derta.models.templates import resolve_template
from derta.train.attention import use_row_attention
from derta.train.circuit import CircuitBreakerTrainer
from derta.train.collators import PACKING_ATTENTION, EpochCallback, EpochRows, PackCollator, PadCollator
from derta.train.config import DertaConfig
from derta.train.dpo import dpo_examples, dpo_trainer
from derta.train.trainer import CHECKPOINT_MARKER, DertaTrainer, last_complete_checkpoint, trunk_record


def prepare_rows(
    rows: list[dict], tokenizer, config: DertaConfig, data_path: str | None = None
) -> tuple[list[dict], int]:
    """Tokenize text rows with the model's tokenizer and truncate to max_length.

    Returns (rows, dropped): rows left with no label by the truncation are dropped and counted.
    RTO rows keep every refusal label here; `EpochRows` draws the kept share afresh each epoch.
    """
    vocab = len(tokenizer)
    out, dropped = [], 0
    for row in rows:
        if "input_ids" not in row:
            row = {**row, **tokenize_row(row, tokenizer, config.template, config.refusal_phrase)}
        elif (top := max(row["input_ids"] + row["labels"], default=0)) >= vocab:
            # Rows tokenized for another model would train on garbage without a word said.
            raise InputError(
                f"token id {top} is outside this model's vocabulary "
                f"({vocab}): the rows were tokenized for another model; rebuild them with its --tokenizer, "
                "or without --tokenizer",
                data_path,
                row.get("_line"),
            )
        ids, labels = row["input_ids"][: config.max_length], row["labels"][: config.max_length]
        if all(x == IGNORE for x in labels[1:]):
            dropped += 1
            continue
        kept = {"input_ids": ids, "labels": labels, "loss_weight": row.get("loss_weight", 1.0), "kind": row["kind"]}
        if row["kind"] == "rto":
            # An explicit --rto-keep-ratio / --rto-weight wins over what the row carries.
            kept["rto_keep_ratio"] = (
                config.rto_keep_ratio if config.rto_keep_ratio is not None else row.get("rto_keep_ratio", 1.0)
            )
            if config.rto_weight is not None:
                kept["loss_weight"] = config.rto_weight
        out.append(kept)
    return out, dropped


def _load_reference(config: DertaConfig, model, dtype: str):
    """The constrained objective's reference model (--constrain-to), or None; it must share the model's vocabulary."""
    if not config.constrain_to:
        return None
    reference = load_model(config.constrain_to, dtype=dtype)
    ours, theirs = model.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise InputError(
            f"--constrain-to: the reference model's vocabulary ({theirs}) is not the model's ({ours})",
            config.constrain_to,
        )
    return reference


def _with_lora(model, config: DertaConfig, token_ids: list[int] | None = None):
    """The model with LoRA layers (peft) as the config says: all linear projections, or those of the top N layers;
    `token_ids`: embedding rows trained as well (new special tokens), input and output embeddings."""
    from peft import LoraConfig, get_peft_model

    targets = config.lora_target_modules
    set_seed(config.seed)  # LoRA A is initialised here, before Trainer seeds: same --seed, same run
    layers = None
    if config.lora_layers is not None:
        total = model.config.num_hidden_layers
        if not 0 < config.lora_layers <= total:
            raise InputError(f"--lora-layers must be between 1 and the model's {total} layers")
        layers = list(range(total - config.lora_layers, total))
    if targets == "all-linear" and layers is not None:
        # peft takes a layer subset only with module names: every linear layer's name but the output head's.
        out_head = model.get_output_embeddings()
        targets = ",".join(
            sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not out_head
                }
            )
        )
    trainable = None
    if token_ids:
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        trainable = {names[model.get_input_embeddings()]: token_ids}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            trainable[names[head]] = token_ids  # an untied output head needs its own rows trained
    return get_peft_model(
        model,
        LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
            layers_to_transform=layers,
            trainable_token_indices=trainable,
        ),
    )


def _check_output(config: DertaConfig, resume: bool, restart: bool = False) -> tuple[Path, str | None]:
    """The output directory and its last checkpoint; a finished or interrupted run there without --resume is refused
    (with `restart`, an interrupted run's checkpoints are removed first)."""
    out = Path(config.output_dir)
    if (out / "derta_train.json").exists():
        raise InputError("output directory already holds a finished model: choose a new --output", out)
    if restart and config.should_save:
        lock_dir(out, "--output")
        for old in [*out.glob("checkpoint-*"), *out.glob("incomplete-checkpoint-*")]:
            if old.is_dir():
                shutil.rmtree(old)
        (out / RUN_MANIFEST).unlink(missing_ok=True)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last and not resume:
        raise InputError(
            "output directory has checkpoints from an interrupted run: pass --resume to continue it, "
            "--restart to start over, or choose a new --output",
            out,
        )
    if config.merge_lora and (config.deepspeed or config.fsdp):
        raise InputError(
            "--merge needs the whole model in one process: train the adapter under DeepSpeed / FSDP, "
            "then merge it in one process (peft's merge_and_unload)"
        )
    return out, last


# What a resumed run must share with the run it continues: each of these changes what training computes.
RESUME_SETTINGS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "seed",
    "bf16",
    "fp16",
    "max_length",
    "template",
    "refusal_phrase",
    "rto_keep_ratio",
    "rto_weight",
    "loss_impl",
    "padding_free",
    "cpu_bf16",
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_layers",
    "merge_lora",
    "constraint_beta",
    "dpo_beta",
    "dpo_sft_weight",
    "cb_alpha",
    "cb_layers",
    "cb_skip_massive",
    "cb_warmup_steps",
    "world_size",
)
RUN_MANIFEST = "manifest.json"  # OUTPUT/manifest.json: the settings and inputs a --resume must match


def _start_run(config: DertaConfig, out: Path, model_name: str, data_path: str, dtype: str, resuming: bool) -> dict:
    """What this run is (settings that change results, fingerprints of the model and data), for OUTPUT/manifest.json;
    a --resume with other settings or changed inputs is refused here with one line naming what changed. The main
    process takes the directory's lock."""
    manifest = {
        **{k: getattr(config, k, None) for k in RESUME_SETTINGS},
        "dtype": dtype,
        "inputs": fingerprints({"--model": model_name, "--data": data_path, "--constrain-to": config.constrain_to}),
    }
    manifest = loads(json_text(manifest))  # as it reads back (enums as strings)
    path = out / RUN_MANIFEST
    if resuming and path.is_file():
        old = loads(read_text(path), path)
        if isinstance(old, dict):
            old.setdefault("cpu_bf16", "off")  # runs recorded before the setting existed trained in float32
            old.setdefault("cb_skip_massive", 0.0)  # and rerouted over every dimension
            old.setdefault("cb_warmup_steps", 0)  # with the paper's schedule
            compare_manifest(old, manifest, path)
    if config.should_save:
        lock_dir(out, "--output")
    return manifest


def check_finite(model, out: Path, step: int) -> None:
    """Training that left a weight NaN or infinite stops before the model is saved (one line, exit 2)."""
    if bad := nonfinite_tensors(model):
        raise InputError(
            f"training stopped after step {step}: {describe_nonfinite(bad)}; no model saved (lower the learning "
            "rate; any checkpoint in the output directory is from before)",
            out,
        )


@dataclass
class _Data:
    """What training reads from a data file: the rows (or DPO examples) and what the log reports about them."""

    rows: list[dict]
    dropped: int
    shares: dict | None
    special: list[str]  # the rows' refusal tokens
    new_tokens: list[str]  # those the tokenizer did not have yet
    examples: list[dict] | None = None  # DPO's, when the rows are pairs

    @property
    def dpo(self) -> bool:
        return self.examples is not None

    @property
    def reroute(self) -> bool:  # circuit-breaker rows: trained by train.circuit
        return any(r["kind"] == "reroute" for r in self.rows)


def _read_data(config: DertaConfig, tokenizer, data_path: str) -> _Data:
    text_rows = load_training_rows(data_path)
    # Rows built with --refusal-tokens: the tokenizer gets their special tokens (same rows, same order, same ids as
    # data build --tokenizer gave them) and the model room for them (init_new_embeddings).
    special = refusal_token_list(text_rows)
    new_tokens = add_special_tokens(tokenizer, special)
    if new_tokens and config.use_lora and not config.merge_lora:
        raise InputError(
            "the rows' refusal tokens grow the vocabulary, which a LoRA adapter alone cannot carry: "
            "add --merge (or train without --lora)",
            data_path,
        )
    if any(r["kind"] == "pair" for r in text_rows):
        if config.constrain_to:
            raise InputError("--constrain-to applies to the cross-entropy recipes, not to DPO rows", data_path)
        examples = dpo_examples(text_rows, tokenizer, config, data_path)
        return _Data([{"kind": r["kind"]} for r in text_rows], 0, None, special, new_tokens, examples)
    if any(r["kind"] == "reroute" for r in text_rows):
        if not config.use_lora:
            raise InputError("circuit-breakers rows train a LoRA adapter: add --lora (the frozen model is the base)")
        if config.constrain_to:
            raise InputError("--constrain-to applies to the cross-entropy recipes, not to circuit-breakers", data_path)
    rows, dropped = prepare_rows(text_rows, tokenizer, config, data_path)
    if not rows:
        raise InputError("no row has a trained token within --max-length", data_path)
    if dropped:
        print(
            f"derta: dropped {dropped} rows left with no trained token by --max-length {config.max_length}",
            file=sys.stderr,
        )
    shares = label_token_shares(rows, every_kind=True)
    print("derta: trained-token shares " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()), file=sys.stderr)
    if shares["rto"] > RTO_SHARE_WARN:
        print(
            f"derta: warning: RTO is {shares['rto']:.0%} of trained tokens (> {RTO_SHARE_WARN:.0%}); "
            "lower --rto-keep-ratio or --rto-weight, or the model may learn to refuse everywhere",
            file=sys.stderr,
        )
    return _Data(rows, dropped, shares, special, new_tokens)


def _make_trainer(config: DertaConfig, model, dtype: str, tokenizer, data: _Data, callbacks: list):
    """(the Trainer for these rows, whether its batches are packed)."""
    init_new_embeddings(model, tokenizer, data.new_tokens, config.refusal_phrase)
    reference = _load_reference(config, model, dtype)
    packing = (
        not data.dpo
        and config.padding_free
        and getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION
    )
    row_attention = packing and config.row_attention and use_row_attention(model)
    if not data.dpo and config.padding_free and not packing and config.train_sampling_strategy == "random":
        # The next best thing to packing: rows of similar length share a batch (less padding).
        config.train_sampling_strategy = "group_by_length"
    if config.use_lora:
        # The new tokens' embedding rows train beside the adapter (peft's trainable tokens; tied heads follow).
        model = _with_lora(
            model, config, [tokenizer.convert_tokens_to_ids(t) for t in data.special] if data.new_tokens else None
        )
    if data.dpo:
        trainer = dpo_trainer(config, model, tokenizer, data.examples, callbacks)
    elif data.reroute:
        trainer = CircuitBreakerTrainer(
            model=model,
            args=config,
            train_dataset=data.rows,
            data_collator=PackCollator(reroute=True) if packing else PadCollator(tokenizer.pad_token_id, reroute=True),
            processing_class=tokenizer,
            callbacks=callbacks,
        )
    else:
        dataset = EpochRows(data.rows, config.seed)
        trainer = DertaTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            data_collator=PackCollator() if packing else PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=[EpochCallback(dataset), *callbacks],
            reference_model=reference,
        )
    trainer.row_attention = row_attention
    if config.disable_tqdm:
        trainer.remove_callback(PrinterCallback)  # quiet: the log still goes to derta_train.json
    elif not show_progress():  # piped into a log: the loss lines without the bar's redraws
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(PrinterCallback)
    return trainer, packing


def _save(trainer, config: DertaConfig, tokenizer, out: Path) -> None:
    final = trainer.model
    if config.use_lora and "ref" in getattr(final, "peft_config", {}):
        final.delete_adapter("ref")  # TRL's frozen reference adapter (DPO) is not part of the trained model
    if config.use_lora and config.merge_lora:
        final = final.merge_and_unload()
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # Each process holds a shard of the weights: all take part in gathering them, the main one writes.
        trainer.save_model(str(out))
    elif trainer.is_world_process_zero():
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


def train(
    config: DertaConfig,
    model_name: str,
    data_path: str,
    resume: bool = False,
    dtype: str = "auto",
    callbacks: list | None = None,
    restart: bool = False,
) -> Path:
    """Fine-tune `model_name` on a `data build` output; returns the directory with the final model.

    Rows from `data build --recipe dpo` (pair rows) are trained with TRL's DPOTrainer, all others with
    DertaTrainer. An interrupted run continues with `resume=True` from its last checkpoint (save_steps apart),
    if its settings and inputs are those it started with (OUTPUT/manifest.json); `restart` discards it instead.
    The weights are checked to be finite at every checkpoint and before the final model is saved.
    """
    if not torch.cuda.is_available():
        config.dataloader_pin_memory = False
    out, last = _check_output(config, resume, restart)
    if Path(model_name).is_dir():  # an adapter records its base model: make it loadable from anywhere
        model_name = str(Path(model_name).resolve())
    check_model_files(model_name)  # a broken model fails before the data is read
    tokenizer = load_tokenizer(model_name)
    config.template = resolve_template(tokenizer, config.template)
    manifest = _start_run(config, out, model_name, data_path, dtype, bool(resume and last))
    data = _read_data(config, tokenizer, data_path)  # cheap checks first: a bad row fails before a slow load
    trainer, packing = _make_trainer(
        config, load_model(model_name, dtype=dtype), dtype, tokenizer, data, list(callbacks or [])
    )
    if trainer.is_world_process_zero():  # written once everything checked out, just before the first step
        write_json(out / RUN_MANIFEST, manifest)
    if resume and last:
        last = last_complete_checkpoint(out)
        if last:
            trainer.loss_sum_before = json.loads((Path(last) / CHECKPOINT_MARKER).read_text())["loss_sum"]
    result = trainer.train(resume_from_checkpoint=last if resume and last else None)
    steps_here = trainer.state.global_step - trainer._initial_global_step
    train_loss = (trainer.loss_sum_before + result.training_loss * steps_here) / max(trainer.state.global_step, 1)
    check_finite(trainer.model, out, trainer.state.global_step)
    _save(trainer, config, tokenizer, out)
    if trainer.is_world_process_zero():
        write_json(out / "derta_train.json", _record(config, trainer, model_name, data_path, data, packing, train_loss))
    return out


def _record(config: DertaConfig, trainer, model_name: str, data_path: str, data: _Data, packing: bool, loss) -> dict:
    """derta_train.json: what was trained on what, how, and its log."""
    return {
        "model": model_name,
        "data": str(data_path),
        "trainer": "dpo" if data.dpo else "circuit-breakers" if data.reroute else "derta",
        "rows": {k: sum(r["kind"] == k for r in data.rows) for k in KINDS},
        "dropped_rows": data.dropped,
        "label_shares": data.shares,
        "padding_free": packing,
        "cpu_bf16": getattr(trainer, "cpu_bf16", False),  # resolved: whether autocast ran (never for DPO)
        "cpu_bf16_features": cpu_bf16_features(),
        "trunk_cache": trunk_record(trainer),
        "row_attention": getattr(trainer, "row_attention", False),
        "processes": config.world_size,
        "steps": trainer.state.global_step,
        "train_loss": loss,
        "log_history": [h for h in trainer.state.log_history if "loss" in h],
        "config": {k: v for k, v in config.to_dict().items() if not k.endswith("token")},
    }
