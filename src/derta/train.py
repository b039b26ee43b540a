"""DeRTa training on the Hugging Face Trainer stack: a config dataclass and a thin Trainer subclass.

`DertaConfig` is `TrainingArguments` plus what DeRTa needs, so accelerate, DeepSpeed, FSDP and
bf16 work unchanged (put their settings in the YAML config). `DertaTrainer` only changes the
loss: a token-level cross-entropy in which RTO tokens carry the row's `loss_weight`, and which
reports the MLE and RTO parts separately.

Paper defaults: full fine-tuning lr 2e-5 (8B); LoRA lr 1e-4, r 96, alpha 16, dropout 0.05 on all
projection modules (70B); 2 epochs; effective batch 128 (8 per device x 16 accumulation steps).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainingArguments

from .data import IGNORE, load_training_rows, sample_rto_labels, tokenize_row
from .io import InputError, write_json
from .models import load_model, load_tokenizer, resolve_template

FULL_FT_LR, LORA_LR = 2e-5, 1e-4


@dataclass
class DertaConfig(TrainingArguments):
    # Paper defaults where the paper gives them; everything else is TrainingArguments'.
    learning_rate: float = field(default=FULL_FT_LR, metadata={"help": "2e-5 full fine-tuning, 1e-4 LoRA (paper)"})
    num_train_epochs: float = 2.0
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 16
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.03
    logging_steps: float = 10
    save_steps: float = 200
    save_total_limit: int | None = 2
    report_to: str | list[str] | None = "none"
    remove_unused_columns: bool = False
    # DeRTa
    max_length: int = field(default=2048, metadata={"help": "rows are truncated to this many tokens"})
    template: str = field(default="auto", metadata={"help": "prompt format for text rows: auto|chat|inst|raw|format string"})
    refusal_phrase: str = "Sorry"
    rto_keep_ratio: float = 1.0
    rto_weight: float = 1.0
    # LoRA (peft)
    use_lora: bool = False
    lora_r: int = 96
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    lora_layers: int | None = field(default=None, metadata={"help": "LoRA on the top N decoder layers only: no backward "
                                                                    "through the layers below (CPU runs)"})
    merge_lora: bool = False


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id) and labels (-100); passes each row's loss weight and kind."""

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "loss_weight": torch.tensor([float(r.get("loss_weight", 1.0)) for r in rows]),
            "is_rto": torch.tensor([r["kind"] == "rto" for r in rows]),
        }


class DertaTrainer(Trainer):
    """Trainer whose loss is Σ w·NLL over labelled tokens / (number of labelled tokens)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = {"mle": [0.0, 0], "rto": [0.0, 0], "rto_hit": [0.0, 0]}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        weight = inputs.pop("loss_weight")
        is_rto = inputs.pop("is_rto")
        outputs = model(**inputs)
        logits = outputs.logits[:, :-1]
        targets = labels[:, 1:]
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                              reduction="none").view_as(targets)
        mask = targets.ne(IGNORE)
        token_weight = weight[:, None].to(nll.dtype) * mask
        denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
        loss = (nll * token_weight).sum() / denom
        with torch.no_grad():
            rto_mask = mask & is_rto[:, None]
            for name, m in (("mle", mask & ~is_rto[:, None]), ("rto", rto_mask)):
                self._parts[name][0] += float(nll[m].sum())
                self._parts[name][1] += int(m.sum())
            if rto_mask.any():
                hits = logits.argmax(-1).eq(targets) & rto_mask
                self._parts["rto_hit"][0] += float(hits.sum())
                self._parts["rto_hit"][1] += int(rto_mask.sum())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        # Per-token averages since the last log, so the two objectives can be watched apart.
        if "loss" in logs:
            names = {"mle": "mle_loss", "rto": "rto_loss", "rto_hit": "rto_accuracy"}
            for key, (total, count) in self._parts.items():
                if count:
                    logs[names[key]] = round(total / count, 4)
            self._parts = {k: [0.0, 0] for k in self._parts}
        super().log(logs, start_time)


# ---------------------------------------------------------------- data


def prepare_rows(rows: list[dict], tokenizer, config: DertaConfig, data_path: str | None = None) -> list[dict]:
    """Tokenize text rows with the model's tokenizer, truncate to max_length, drop rows left with no label."""
    rng = random.Random(config.seed + 1)
    vocab = len(tokenizer)
    out = []
    for row in rows:
        if "input_ids" not in row:
            row = {**row, **tokenize_row(row, tokenizer, config.template, config.refusal_phrase, config.rto_weight)}
        elif (top := max(row["input_ids"] + row["labels"])) >= vocab:
            # Rows tokenized for another model would train on garbage without a word said.
            raise InputError(f"token id {top} is outside this model's vocabulary "
                             f"({vocab}): the rows were tokenized for another model; rebuild them with its --tokenizer, "
                             "or without --tokenizer", data_path, row.get("_line"))
        labels = row["labels"]
        if row["kind"] == "rto":
            labels = sample_rto_labels(labels, row.get("rto_keep_ratio", config.rto_keep_ratio), rng)
        ids, labels = row["input_ids"][: config.max_length], labels[: config.max_length]
        if all(x == IGNORE for x in labels[1:]):
            continue
        out.append({"input_ids": ids, "labels": labels, "loss_weight": row.get("loss_weight", 1.0), "kind": row["kind"]})
    return out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


# ---------------------------------------------------------------- entry point


def train(config: DertaConfig, model_name: str, data_path: str, resume: bool = False, dtype: str = "auto",
          callbacks: list | None = None) -> Path:
    """Fine-tune `model_name` on a `data build` output; returns the directory with the final model.

    An interrupted run continues with `resume=True` from its last checkpoint (save_steps apart).
    """
    from transformers.trainer_utils import get_last_checkpoint

    if not torch.cuda.is_available():
        config.dataloader_pin_memory = False
    out = Path(config.output_dir)
    if (out / "derta_train.json").exists():
        raise InputError("output directory already holds a finished model: choose a new --output", out)
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if last and not resume:
        raise InputError("output directory has checkpoints from an interrupted run: pass --resume to continue it, "
                         "or choose a new --output", out)
    if Path(model_name).is_dir():
        model_name = str(Path(model_name).resolve())  # an adapter records its base model: make it loadable from anywhere

    tokenizer = load_tokenizer(model_name)
    config.template = resolve_template(tokenizer, config.template)
    rows = prepare_rows(load_training_rows(data_path), tokenizer, config, data_path)
    if not rows:
        raise InputError("no row has a trained token within --max-length", data_path)
    model = load_model(model_name, dtype=dtype)
    if config.use_lora:
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

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
            targets = ",".join(sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                       if isinstance(m, torch.nn.Linear) and m is not out_head}))
        model = get_peft_model(model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","), task_type="CAUSAL_LM",
            layers_to_transform=layers,
        ))
    trainer = DertaTrainer(
        model=model, args=config, train_dataset=ListDataset(rows), data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks,
    )
    if config.disable_tqdm:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # quiet: the log still goes to derta_train.json
    result = trainer.train(resume_from_checkpoint=last if resume and last else None)

    final = trainer.model
    if config.use_lora and config.merge_lora:
        final = final.merge_and_unload()
    if trainer.is_world_process_zero():
        final.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        kinds = {k: sum(r["kind"] == k for r in rows) for k in ("helpful", "safe", "prefix", "rto")}
        history = [h for h in trainer.state.log_history if "loss" in h]
        write_json(out / "derta_train.json", {
            "model": model_name, "data": str(data_path), "rows": kinds, "steps": trainer.state.global_step,
            "train_loss": result.training_loss, "log_history": history,
            "config": {k: v for k, v in config.to_dict().items() if not k.endswith("token")},
        })
    return out


# ---------------------------------------------------------------- from CLI flags (the flags are defined in cli.py)


_CLI_TO_CONFIG = {
    "epochs": "num_train_epochs", "max_steps": "max_steps", "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size", "grad_accum": "gradient_accumulation_steps",
    "max_length": "max_length", "seed": "seed", "template": "template", "refusal_phrase": "refusal_phrase",
    "save_steps": "save_steps", "logging_steps": "logging_steps", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout", "lora_target_modules": "lora_target_modules", "lora_layers": "lora_layers",
}


def config_from_cli(args) -> DertaConfig:
    """YAML first, then explicit flags on top."""
    values: dict = {}
    if args.config:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.config).read_text())
        except (OSError, yaml.YAMLError) as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            raise InputError(f"cannot read config: {str(e).splitlines()[0]}", args.config, line + 1 if line is not None else None) from None
        if not isinstance(loaded, dict):
            raise InputError("config must be a mapping of field: value", args.config)
        known = {f.name for f in fields(DertaConfig)}
        for key in loaded:
            if key not in known:
                raise InputError(f"unknown config field '{key}'", args.config)
        values.update(loaded)
    for flag, name in _CLI_TO_CONFIG.items():
        if getattr(args, flag, None) is not None:
            values[name] = getattr(args, flag)
    if args.max_steps is not None:
        values["num_train_epochs"] = 1  # ignored by Trainer when max_steps > 0
    if args.lora:
        values["use_lora"] = True
        values.setdefault("learning_rate", LORA_LR)
    if args.merge:
        if not values.get("use_lora"):
            raise InputError("--merge only applies with --lora")
        values["merge_lora"] = True
    if args.bf16:
        values["bf16"] = True
    if args.quiet:
        values["disable_tqdm"] = True
    values["output_dir"] = args.output
    try:
        config = DertaConfig(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad training setting: {str(e).splitlines()[0]}", args.config) from None
    if not math.isfinite(config.learning_rate) or config.learning_rate <= 0:
        raise InputError("--learning-rate must be positive")
    return config


def run_from_cli(args) -> Path:
    return train(config_from_cli(args), args.model, args.data, resume=args.resume, dtype=args.dtype)
