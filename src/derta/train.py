"""DeRTa training on the Hugging Face Trainer stack: a config dataclass and a thin Trainer subclass.

`DertaConfig` is `TrainingArguments` plus what DeRTa needs, so accelerate, DeepSpeed, FSDP and
bf16 work unchanged (put their settings in the YAML config). `DertaTrainer` only changes the
loss: a token-level cross-entropy in which RTO tokens carry the row's `loss_weight`, and which
reports the MLE and RTO parts separately.

Speed (issue #8): the loss runs the decoder body once, keeps only the hidden states whose next
token is labelled, and applies the output projection + cross-entropy to those in chunks that are
recomputed in backward, so no batch x length x vocabulary tensor ever exists (`loss_impl:
chunked`; `full` is the plain logits loss, kept for comparison). Batches are padding-free by
default: the rows of a batch are packed into one sequence whose position_ids restart per row.

Paper defaults: full fine-tuning lr 2e-5 (8B); LoRA lr 1e-4, r 96, alpha 16, dropout 0.05 on all
projection modules (70B); 2 epochs; effective batch 128 (8 per device x 16 accumulation steps).
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainerCallback, TrainingArguments

from .data import (IGNORE, KINDS, RTO_SHARE_WARN, label_token_counts, load_training_rows, refusal_token_list,
                   sample_rto_labels, tokenize_row)
from .io import NUMERIC_RULES, InputError, write_json
from .models import (add_special_tokens, check_model_files, init_new_embeddings, load_model, load_tokenizer,
                     resolve_template, safetensors_problem)

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
    # None: what each row carries from `data build` (else 1.0); a value overrides every RTO row.
    rto_keep_ratio: float | None = field(default=None, metadata={"help": "share of each RTO row's positions trained, re-drawn every epoch"})
    rto_weight: float | None = field(default=None, metadata={"help": "loss weight of RTO tokens"})
    loss_impl: str = field(default="chunked", metadata={"help": "chunked (labelled positions only) | full (all logits)"})
    padding_free: bool = field(default=True, metadata={"help": "pack each batch into one sequence (else pad, length-grouped)"})
    allow_nonfinite_loss: bool = field(default=False, metadata={"help": "go on when the loss is NaN or infinite (default: "
                                                                        "stop with an error, no model saved)"})
    # LoRA (peft)
    use_lora: bool = False
    lora_r: int = 96
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = "all-linear"
    lora_layers: int | None = field(default=None, metadata={"help": "LoRA on the top N decoder layers only: no backward "
                                                                    "through the layers below (CPU runs)"})
    merge_lora: bool = False
    # Qi et al.'s token-wise constrained objective (docs/baselines.md): stay close to this model on the first tokens.
    constrain_to: str | None = field(default=None, metadata={"help": "reference model of the token-wise constrained "
                                                                     "objective (Qi et al.); None: plain cross-entropy"})
    constraint_beta: float = field(default=0.1, metadata={"help": "beta of the constrained objective; the first token "
                                                                  "gets 5x, tokens 2-5 20x (Qi et al.'s schedule)"})
    # DPO (rows from `data build --recipe dpo`), trained with TRL's DPOTrainer
    dpo_beta: float = field(default=0.1, metadata={"help": "DPO's beta (strength of the KL term)"})
    dpo_sft_weight: float = field(default=1.0, metadata={"help": "weight of the SFT (NLL of chosen) term added to DPO's "
                                                                 "loss; helpful rows are trained only through it"})


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


@dataclass
class PackCollator:
    """Concatenates the rows of a batch into one sequence with per-row position_ids (no padding, no mask).

    The attention layers see where a row starts from position_ids going back to 0. loss_weight and
    is_rto become per-token so each token keeps its own row's values.
    """

    def __call__(self, rows: list[dict]) -> dict:
        ids, labels, positions, weight, is_rto = [], [], [], [], []
        for r in rows:
            n = len(r["input_ids"])
            ids += r["input_ids"]
            # The first token of a row must not be the target of the previous row's last position.
            labels += [IGNORE] + list(r["labels"][1:])
            positions += range(n)
            weight += [float(r.get("loss_weight", 1.0))] * n
            is_rto += [r["kind"] == "rto"] * n
        return {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]),
            "loss_weight": torch.tensor([weight]),
            "is_rto": torch.tensor([is_rto]),
        }


# Attention implementations that read packed-sequence boundaries from position_ids in transformers 5.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# Rows of hidden states per output-projection chunk: about 2**25 logits (128 MB in fp32) at a time.
LOGITS_PER_CHUNK = 2 ** 25


def _causal_lm_parts(model):
    """(decoder body, output projection, CausalLM) of a model, through peft and DDP wrappers."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, so the base model has them
        model = model.get_base_model()
    return model.get_decoder(), model.get_output_embeddings(), model


def _chunk_nll(hidden, targets, head, softcap):
    """NLL and argmax of the logits of one chunk; called under checkpoint so the logits are not kept."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)


def labelled_hidden(model, inputs: dict, labels: torch.Tensor):
    """Decoder-body hidden states at the positions whose next-token label is not -100.

    Returns (hidden (N, H), targets (N,), mask (B, T-1), output projection, final-logit softcap or None).
    """
    body, head, lm = _causal_lm_parts(model)
    hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE)
    return hidden[mask], targets[mask], mask, head, getattr(lm.config, "final_logit_softcapping", None)


def chunked_nll(hidden, targets, head, softcap=None):
    """Per-token NLL and argmax, LOGITS_PER_CHUNK logits at a time, each chunk recomputed in backward."""
    rows = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
    parts = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        parts.append(checkpoint(_chunk_nll, h, t, head, softcap, use_reentrant=False)
                     if torch.is_grad_enabled() else _chunk_nll(h, t, head, softcap))
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32), targets.new_zeros(0)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _liger_function(hidden, head):
    """Liger-Kernel's fused linear cross-entropy when it applies (CUDA, liger-kernel installed: the `cuda` extra)."""
    if not hidden.is_cuda or head.bias is not None:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def grouped_fused_loss(fused_ce, hidden, targets, head, token_weight, token_rto, softcap=None):
    """Σ w·NLL and the per-part sums from a fused linear cross-entropy `fused_ce(h, W, t, reduction="sum", softcap=)`.

    It is called once per (weight, kind) group, so per-token weights need no per-token output from
    the kernel. The kernel gives no argmax, so rto_accuracy is not logged on this path.
    """
    total, parts = hidden.new_zeros((), dtype=torch.float32), {"mle": [0.0, 0], "rto": [0.0, 0]}
    for w, rto in torch.unique(torch.stack([token_weight, token_rto.float()], 1), dim=0).tolist():
        group = token_weight.eq(w) & token_rto.eq(bool(rto))
        out = fused_ce(hidden[group], head.weight, targets[group], reduction="sum", softcap=softcap)
        nll_sum = (out[0] if isinstance(out, tuple) else out).float()
        total = total + w * nll_sum
        part = parts["rto" if rto else "mle"]
        part[0] += float(nll_sum.detach())
        part[1] += int(group.sum())
    return total, {k: tuple(v) for k, v in parts.items() if v[1]}


def full_logits_nll(model, inputs: dict, labels: torch.Tensor):
    """The plain loss: logits at every position, copied to fp32. Returns (nll, argmax, mask) at the labelled positions."""
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE)
    nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view_as(targets)
    return nll[mask], logits.argmax(-1)[mask], mask


# Qi et al.'s per-position beta schedule, as multiples of --constraint-beta (their code's defaults: beta 0.1,
# first_token_bias_factor 5, bias_factor 20, bias_length 5): 0.5 on a row's first trained token, 2 on tokens 2-5,
# 0.1 after.
CONSTRAINT_FIRST, CONSTRAINT_EARLY, CONSTRAINT_EARLY_TOKENS = 5.0, 20.0, 5


def constraint_betas(rank: torch.Tensor, beta: float) -> torch.Tensor:
    """beta_t of each trained token from its rank among its row's trained tokens (0 = the first)."""
    scale = torch.where(rank == 0, CONSTRAINT_FIRST, torch.where(rank < CONSTRAINT_EARLY_TOKENS, CONSTRAINT_EARLY, 1.0))
    return beta * scale


def constraint_weights(nll: torch.Tensor, ref_nll: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Per-token weights that turn cross-entropy into Qi et al.'s token-wise constrained objective.

    Their objective is sum_t (2/beta_t) softplus(-beta_t d_t), d_t = log p(y_t) - log p_ref(y_t); its gradient
    is 2 sigmoid(-beta_t d_t) times cross-entropy's. As in their code the weight is detached and clamped at
    1e-3, so weight x NLL has that gradient, equals NLL at beta = 0, and grows as the model falls below the
    reference (d_t < 0: up to 2x) and fades where it is already above it.
    """
    return (2 * torch.sigmoid(-betas * (ref_nll - nll).detach())).clamp(min=1e-3)


def _ranks_in_row(inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """For each labelled target (in `mask`'s row-major order): how many trained tokens of its row come before it."""
    if "position_ids" in inputs:  # packed: a row starts where position_ids go back to 0
        row = (inputs["position_ids"] == 0).cumsum(-1)[:, 1:]
    else:
        row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    row = row[mask]
    index = torch.arange(row.numel(), device=row.device)
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    return index - torch.cummax(torch.where(first, index, 0), 0).values


def _reference_nll(reference, inputs: dict, labels: torch.Tensor, loss_impl: str) -> torch.Tensor:
    """The reference model's NLL of every labelled target (no gradient)."""
    with torch.no_grad():
        if loss_impl == "full":
            return full_logits_nll(reference, inputs, labels)[0]
        hidden, targets, _, head, softcap = labelled_hidden(reference, inputs, labels)
        return chunked_nll(hidden, targets, head, softcap)[0]


def _as_wrapped_forward(wrapper, compute):
    """Call `wrapper()` with its inner module's forward temporarily replaced by `compute`."""
    inner = wrapper.module
    own = vars(inner).get("forward")  # accelerate may have set an instance forward (autocast); keep it
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return wrapper()
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


def batch_loss(model, inputs: dict, loss_impl: str = "chunked", num_items_in_batch=None, reference=None,
               constraint_beta: float = 0.1) -> tuple[torch.Tensor, dict]:
    """Σ w·NLL over labelled tokens / (number of labelled tokens), and the per-part sums for logging.

    `inputs` is a collator batch (padded or packed); it is not modified. With a `reference` model each
    token's NLL is also weighted by Qi et al.'s constraint (`constraint_weights`, beta from `constraint_betas`).
    """
    if loss_impl != "full" and isinstance(model, torch.nn.DataParallel):
        loss_impl = "full"  # its replicas run only inside its own forward: nothing to gather hidden states from
    elif loss_impl != "full" and hasattr(model, "module"):
        # DDP, FSDP and DeepSpeed do their work (gradient sync, parameter gathering) in their own forward:
        # compute the loss as the wrapped module's forward, through the wrapper.
        return _as_wrapped_forward(model, lambda: batch_loss(model.module, inputs, loss_impl, num_items_in_batch,
                                                             reference, constraint_beta))
    inputs = dict(inputs)
    labels, weight, is_rto = inputs.pop("labels"), inputs.pop("loss_weight"), inputs.pop("is_rto")
    if weight.dim() == 1:  # padded batches carry one value per row, packed ones one per token
        weight, is_rto = weight[:, None].expand_as(labels), is_rto[:, None].expand_as(labels)
    if loss_impl == "full":
        nll, argmax, mask = full_logits_nll(model, inputs, labels)
    else:
        hidden, targets, mask, head, softcap = labelled_hidden(model, inputs, labels)
    # The label at t+1 is predicted at t: a target's weight and kind are those of its own token.
    token_weight = weight[:, 1:][mask].float()
    token_rto = is_rto[:, 1:][mask]
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if loss_impl != "full":
        fused_ce = _liger_function(hidden, head) if reference is None else None  # the constraint needs per-token NLL
        if fused_ce is not None and hidden.shape[0]:
            loss, parts = grouped_fused_loss(fused_ce, hidden, targets, head, token_weight, token_rto, softcap)
            return loss / denom, parts
        nll, argmax = chunked_nll(hidden, targets, head, softcap)
    parts = {}
    if reference is not None:
        betas = constraint_betas(_ranks_in_row(inputs, mask), constraint_beta)
        constraint = constraint_weights(nll, _reference_nll(reference, inputs, labels, loss_impl), betas)
        token_weight = token_weight * constraint
        parts["constraint"] = (float(constraint.sum()), int(constraint.numel()))
    loss = (nll * token_weight).sum() / denom
    with torch.no_grad():
        for name, m in (("mle", ~token_rto), ("rto", token_rto)):
            parts[name] = (float(nll[m].sum()), int(m.sum()))
        if argmax is not None and token_rto.any():
            parts["rto_hit"] = (float((argmax.eq(labels[:, 1:][mask]) & token_rto).sum()), int(token_rto.sum()))
    return loss, parts


class CompleteCheckpoints:
    """Trainer mixin: each checkpoint ends with derta_state.json, so `--resume` can tell a complete one."""

    # The loss summed over the steps before this train() call (from the resumed checkpoint's derta_state.json):
    # Trainer's own train_loss averages only the steps after a resume.
    loss_sum_before = 0.0

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        # Written last, atomically: a checkpoint without it was cut short (killed or disk full mid-save).
        if self.args.should_save:
            ckpt = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            write_json(ckpt / CHECKPOINT_MARKER, {
                "step": self.state.global_step,
                "loss_sum": self.loss_sum_before + self._total_loss_scalar + float(self._tr_loss)})


class DertaTrainer(CompleteCheckpoints, Trainer):
    """Trainer whose loss is Σ w·NLL over labelled tokens / (number of labelled tokens)."""

    def __init__(self, *args, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = {"mle": [0.0, 0], "rto": [0.0, 0], "rto_hit": [0.0, 0], "constraint": [0.0, 0]}
        # The constrained objective's reference (--constrain-to): frozen, on the training device.
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.requires_grad_(False).eval().to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The chunked loss calls the decoder body itself, past the autocast accelerate wraps around
        # model.forward for mixed precision, so it enters that autocast here (a no-op in fp32).
        with self.accelerator.autocast():
            loss, parts = batch_loss(model, inputs, getattr(self.args, "loss_impl", "chunked"), num_items_in_batch,
                                     self.reference_model, getattr(self.args, "constraint_beta", 0.1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch is then the label count of all processes, and DDP / FSDP / DeepSpeed average
            # the gradients over them: scale back up, as Trainer.compute_loss does, so that the loss and its
            # gradients are Σ w·NLL / (labels of the whole step) on any number of processes.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        if not getattr(self.args, "allow_nonfinite_loss", False) and not torch.isfinite(loss.detach()).all():
            # Stop before this step's update reaches the weights: checkpoints already written are finite,
            # and no final model is saved (a NaN model with exit 0 is the worst outcome).
            raise InputError(f"training stopped at step {self.state.global_step + 1}: the loss is {loss.item()}; lower "
                             "the learning rate or check loss weights (the last checkpoint in the output directory is "
                             "from before it; allow_nonfinite_loss: true in --config goes on regardless)")
        for name, (total, count) in parts.items():
            self._parts[name][0] += total
            self._parts[name][1] += count
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        # Per-token averages since the last log, so the two objectives can be watched apart; summed over
        # all processes (every process logs at the same step, the main one prints and writes).
        if "loss" in logs:
            names = {"mle": "mle_loss", "rto": "rto_loss", "rto_hit": "rto_accuracy", "constraint": "constraint_weight"}
            sums = torch.tensor([x for part in self._parts.values() for x in part], dtype=torch.float64,
                                device=self.args.device)
            if self.accelerator.num_processes > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            sums = sums.tolist()
            for i, key in enumerate(self._parts):
                total, count = sums[2 * i], int(sums[2 * i + 1])
                if count:
                    logs[names[key]] = round(total / count, 4)
                if key != "rto_hit":
                    logs[f"{key}_tokens"] = count
            self._parts = {k: [0.0, 0] for k in self._parts}
        super().log(logs, start_time)


# ---------------------------------------------------------------- data


def prepare_rows(rows: list[dict], tokenizer, config: DertaConfig, data_path: str | None = None) -> tuple[list[dict], int]:
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
            raise InputError(f"token id {top} is outside this model's vocabulary "
                             f"({vocab}): the rows were tokenized for another model; rebuild them with its --tokenizer, "
                             "or without --tokenizer", data_path, row.get("_line"))
        ids, labels = row["input_ids"][: config.max_length], row["labels"][: config.max_length]
        if all(x == IGNORE for x in labels[1:]):
            dropped += 1
            continue
        kept = {"input_ids": ids, "labels": labels, "loss_weight": row.get("loss_weight", 1.0), "kind": row["kind"]}
        if row["kind"] == "rto":
            # An explicit --rto-keep-ratio / --rto-weight wins over what the row carries.
            kept["rto_keep_ratio"] = config.rto_keep_ratio if config.rto_keep_ratio is not None else row.get("rto_keep_ratio", 1.0)
            if config.rto_weight is not None:
                kept["loss_weight"] = config.rto_weight
        out.append(kept)
    return out, dropped


class EpochRows(torch.utils.data.Dataset):
    """The training rows; an RTO row's kept positions (its `rto_keep_ratio`) are drawn afresh every epoch.

    The draw is seeded by (seed, epoch, row index), so a run and its resumption see the same positions.
    """

    def __init__(self, rows: list[dict], seed: int = 0):
        self.rows, self.seed, self.epoch = rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        ratio = row.get("rto_keep_ratio", 1.0)
        if row["kind"] != "rto" or ratio >= 1.0:
            return row
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")
        return {**row, "labels": sample_rto_labels(row["labels"], ratio, rng)}


class EpochCallback(TrainerCallback):
    """Tells the dataset which epoch starts (accelerate's loader does not forward set_epoch to it)."""

    def __init__(self, dataset: EpochRows):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.set_epoch(int(state.epoch or 0))


def _label_shares(rows: list[dict]) -> dict[str, float]:
    """Fraction of all trained tokens per objective (every kind listed), RTO rows at their keep ratio."""
    counts = label_token_counts(rows)
    total = sum(counts.values()) or 1.0
    return {k: round(v / total, 4) for k, v in counts.items()}


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_MARKER = "derta_state.json"


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is complete); cheap: headers, not tensors."""
    import zipfile

    try:
        marker = json.loads((ckpt / CHECKPOINT_MARKER).read_text())
        float(marker["loss_sum"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {CHECKPOINT_MARKER} (the save was cut short)"
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text())
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return "trainer_state.json is missing or unreadable"
    weights = [p for p in ("model.safetensors", "adapter_model.safetensors") if (ckpt / p).is_file()]
    weights += [p.name for p in ckpt.glob("model-*.safetensors")]
    if not weights:
        return "no model weights"
    for name in weights:
        problem = safetensors_problem(ckpt / name)
        if problem:
            return problem
    optimizer = ckpt / "optimizer.pt"
    if not optimizer.is_file() or not zipfile.is_zipfile(optimizer):
        return "optimizer.pt is missing or truncated"
    return None


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest checkpoint that is complete; newer broken ones are renamed incomplete-checkpoint-N, saying so."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = sorted((p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]), reverse=True)
    broken = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            break
        aside = ckpt.with_name(f"incomplete-{ckpt.name}")
        if aside.exists():
            import shutil

            shutil.rmtree(aside)
        ckpt.rename(aside)
        broken.append(f"{ckpt.name} ({problem})")
    else:
        ckpt = None
    if broken:
        where = f"resuming from {ckpt.name}" if ckpt else "no complete checkpoint left, starting from the beginning"
        print(f"derta: incomplete checkpoint {', '.join(broken)} renamed incomplete-*; {where}", file=sys.stderr)
    return str(ckpt) if ckpt else None


def _load_reference(config: DertaConfig, model, dtype: str):
    """The constrained objective's reference model (--constrain-to), or None; it must share the model's vocabulary."""
    if not config.constrain_to:
        return None
    reference = load_model(config.constrain_to, dtype=dtype)
    ours, theirs = model.get_output_embeddings().weight.shape[0], reference.get_output_embeddings().weight.shape[0]
    if ours != theirs:
        raise InputError(f"--constrain-to: the reference model's vocabulary ({theirs}) is not the model's ({ours})",
                         config.constrain_to)
    return reference


def _with_lora(model, config: DertaConfig, token_ids: list[int] | None = None):
    """The model with LoRA layers (peft) as the config says: all linear projections, or those of the top N layers;
    `token_ids`: embedding rows trained as well (new special tokens), input and output embeddings."""
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
    trainable = None
    if token_ids:
        names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules()}
        trainable = {names[model.get_input_embeddings()]: token_ids}
        head = model.get_output_embeddings()
        if head is not None and head.weight is not model.get_input_embeddings().weight:
            trainable[names[head]] = token_ids  # an untied output head needs its own rows trained
    return get_peft_model(model, LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=targets if targets == "all-linear" else targets.split(","), task_type="CAUSAL_LM",
        layers_to_transform=layers, trainable_token_indices=trainable,
    ))


# ---------------------------------------------------------------- DPO (data build --recipe dpo)


def dpo_examples(rows: list[dict], tokenizer, config: DertaConfig, data_path=None) -> list[dict]:
    """TRL's `prompt_ids` / `chosen_ids` / `rejected_ids` from derta rows, tokenized as every other recipe's.

    Pair rows: chosen = the refusal (written with the tokenizer's refusal transition), rejected = the harmful
    response, both after the same prompt and ending with the end of turn. Helpful rows: chosen = rejected =
    the response; their DPO margin is 0 whatever the model does (no gradient), so only the SFT term trains them.
    """
    out = []
    for row in rows:
        if row["kind"] not in ("pair", "helpful"):
            raise InputError(f"a DPO data file (data build --recipe dpo) holds pair and helpful rows, not '{row['kind']}'",
                             data_path, row.get("_line"))
        tok = row if "input_ids" in row and (row["kind"] != "pair" or "rejected_input_ids" in row) else \
            tokenize_row(row, tokenizer, config.template, config.refusal_phrase)
        ids = tok["input_ids"] + tok.get("rejected_input_ids", [])
        if max(ids) >= len(tokenizer):
            raise InputError(f"token id {max(ids)} is outside this model's vocabulary ({len(tokenizer)}): the rows were "
                             "tokenized for another model", data_path, row.get("_line"))
        n = next(i for i, x in enumerate(tok["labels"]) if x != IGNORE)  # where the response starts
        chosen = tok["input_ids"][n:]
        out.append({"prompt_ids": tok["input_ids"][:n], "chosen_ids": chosen,
                    "rejected_ids": tok["rejected_input_ids"][n:] if row["kind"] == "pair" else chosen})
    return out


def _dpo_trainer(config: DertaConfig, model, tokenizer, examples: list[dict], callbacks: list):
    """TRL's DPOTrainer (sigmoid DPO loss + dpo_sft_weight x the chosen side's NLL) on derta's settings and rows."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    class DertaDPOTrainer(CompleteCheckpoints, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by derta (exact seams), not re-tokenized from text by TRL

    shared = {f.name: getattr(config, f.name) for f in fields(TrainingArguments) if f.init}
    args = DPOConfig(**shared, beta=config.dpo_beta, loss_type=["sigmoid", "sft"],
                     loss_weights=[1.0, config.dpo_sft_weight], max_length=config.max_length)
    # With LoRA, TRL's reference is a frozen copy of the fresh adapter (= the base model); else a frozen model copy.
    return DertaDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(examples),
                           processing_class=tokenizer, callbacks=callbacks)


# ---------------------------------------------------------------- entry point


def train(config: DertaConfig, model_name: str, data_path: str, resume: bool = False, dtype: str = "auto",
          callbacks: list | None = None) -> Path:
    """Fine-tune `model_name` on a `data build` output; returns the directory with the final model.

    Rows from `data build --recipe dpo` (pair rows) are trained with TRL's DPOTrainer, all others with
    DertaTrainer. An interrupted run continues with `resume=True` from its last checkpoint (save_steps apart).
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
    if config.merge_lora and (config.deepspeed or config.fsdp):
        raise InputError("--merge needs the whole model in one process: train the adapter under DeepSpeed / FSDP, "
                         "then merge it in one process (peft's merge_and_unload)")
    if Path(model_name).is_dir():
        model_name = str(Path(model_name).resolve())  # an adapter records its base model: make it loadable from anywhere

    check_model_files(model_name)  # a broken model fails before the data is read
    tokenizer = load_tokenizer(model_name)
    config.template = resolve_template(tokenizer, config.template)
    text_rows = load_training_rows(data_path)
    # Rows built with --refusal-tokens: the tokenizer gets their special tokens (same rows, same order, same ids as
    # data build --tokenizer gave them) and the model room for them, below.
    special = refusal_token_list(text_rows)
    new_tokens = add_special_tokens(tokenizer, special)
    if new_tokens and config.use_lora and not config.merge_lora:
        raise InputError("the rows' refusal tokens grow the vocabulary, which a LoRA adapter alone cannot carry: "
                         "add --merge (or train without --lora)", data_path)
    dpo = any(r["kind"] == "pair" for r in text_rows)
    if dpo:
        if config.constrain_to:
            raise InputError("--constrain-to applies to the cross-entropy recipes, not to DPO rows", data_path)
        examples = dpo_examples(text_rows, tokenizer, config, data_path)
        rows, dropped, shares = [{"kind": r["kind"]} for r in text_rows], 0, None
    else:
        rows, dropped = prepare_rows(text_rows, tokenizer, config, data_path)
        if not rows:
            raise InputError("no row has a trained token within --max-length", data_path)
        if dropped:
            print(f"derta: dropped {dropped} rows left with no trained token by --max-length {config.max_length}", file=sys.stderr)
        shares = _label_shares(rows)
        print("derta: trained-token shares " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()), file=sys.stderr)
        if shares["rto"] > RTO_SHARE_WARN:
            print(f"derta: warning: RTO is {shares['rto']:.0%} of trained tokens (> {RTO_SHARE_WARN:.0%}); "
                  "lower --rto-keep-ratio or --rto-weight, or the model may learn to refuse everywhere", file=sys.stderr)
    model = load_model(model_name, dtype=dtype)
    init_new_embeddings(model, tokenizer, new_tokens, config.refusal_phrase)
    reference = _load_reference(config, model, dtype)
    packing = not dpo and config.padding_free and getattr(model.config, "_attn_implementation", None) in PACKING_ATTENTION
    if not dpo and config.padding_free and not packing and config.train_sampling_strategy == "random":
        # The next best thing to packing: rows of similar length share a batch (less padding).
        config.train_sampling_strategy = "group_by_length"
    if config.use_lora:
        # The new tokens' embedding rows train beside the adapter (peft's trainable tokens; tied heads follow).
        model = _with_lora(model, config, [tokenizer.convert_tokens_to_ids(t) for t in special] if new_tokens else None)
    if dpo:
        trainer = _dpo_trainer(config, model, tokenizer, examples, list(callbacks or []))
    else:
        dataset = EpochRows(rows, config.seed)
        trainer = DertaTrainer(
            model=model, args=config, train_dataset=dataset,
            data_collator=PackCollator() if packing else PadCollator(tokenizer.pad_token_id),
            processing_class=tokenizer, callbacks=[EpochCallback(dataset), *(callbacks or [])], reference_model=reference,
        )
    if config.disable_tqdm:
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # quiet: the log still goes to derta_train.json
    if resume and last:
        last = last_complete_checkpoint(out)
        if last:
            trainer.loss_sum_before = json.loads((Path(last) / CHECKPOINT_MARKER).read_text())["loss_sum"]
    result = trainer.train(resume_from_checkpoint=last if resume and last else None)
    steps_here = trainer.state.global_step - trainer._initial_global_step
    train_loss = (trainer.loss_sum_before + result.training_loss * steps_here) / max(trainer.state.global_step, 1)

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
    if trainer.is_world_process_zero():
        kinds = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
        history = [h for h in trainer.state.log_history if "loss" in h]
        write_json(out / "derta_train.json", {
            "model": model_name, "data": str(data_path), "trainer": "dpo" if dpo else "derta", "rows": kinds,
            "dropped_rows": dropped, "label_shares": shares, "padding_free": packing, "processes": config.world_size,
            "steps": trainer.state.global_step,
            "train_loss": train_loss, "log_history": history,
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
    "rto_keep_ratio": "rto_keep_ratio", "rto_weight": "rto_weight", "constrain_to": "constrain_to",
    "constraint_beta": "constraint_beta", "dpo_beta": "dpo_beta", "dpo_sft_weight": "dpo_sft_weight",
}


# Every numeric setting's flag and range rule (io.NUMERIC_RULES), checked whether it came from a flag or the
# YAML: Trainer would take -5 steps as "one epoch" without a word.
_SETTING_RULES = {field: ("--" + dest.replace("_", "-"), NUMERIC_RULES[dest])
                  for dest, field in _CLI_TO_CONFIG.items() if dest in NUMERIC_RULES}


def check_ranges(config: "DertaConfig", explicit: set[str], source=None) -> None:
    """One line naming the flag for a setting out of range (NaN and infinities included)."""
    from .io import check_number

    for name, (flag, rule) in _SETTING_RULES.items():
        if name == "max_steps" and name not in explicit:
            continue  # Trainer's own default, -1: "use the epochs"
        check_number(getattr(config, name), flag, rule, source)
    if not config.refusal_phrase.strip():
        raise InputError("--refusal-phrase must not be empty", source)


def _yaml_lines(yaml, text: str) -> dict:
    """Line number of each top-level key of a YAML mapping."""
    node = yaml.compose(text)
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _wrong_type(f, value) -> str | None:
    """What a YAML value for field `f` should be, when it is not (None when it fits or the type is not simple)."""
    names = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}
    spec = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    kinds = {t.strip() for t in spec.replace("Optional[", "").replace("]", "").split("|")}
    if kinds - {"None", *names}:
        return None  # lists, dicts, enums: TrainingArguments checks those itself
    want = " or ".join(names[k] for k in sorted(kinds - {"None"}))
    if value is None:
        return None if "None" in kinds else want
    if isinstance(value, bool):
        return None if "bool" in kinds else want
    if isinstance(value, int) and kinds & {"int", "float"} or isinstance(value, float) and "float" in kinds:
        return None
    return None if isinstance(value, str) and "str" in kinds else want


def config_from_cli(args) -> DertaConfig:
    """YAML first, then explicit flags on top."""
    values: dict = {}
    if args.config:
        import yaml

        from .io import read_text

        text = read_text(args.config, "config file")
        try:
            loaded, lines = yaml.safe_load(text), _yaml_lines(yaml, text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            what = " ".join(str(getattr(e, "problem", None) or e).split())
            raise InputError(f"YAML syntax error: {what}", args.config, mark.line + 1 if mark else None) from None
        if not isinstance(loaded, dict):
            raise InputError("config must be a mapping of field: value", args.config)
        known = {f.name: f for f in fields(DertaConfig)}
        for key, value in loaded.items():
            if key not in known:
                raise InputError(f"unknown config field '{key}'", args.config, lines.get(key))
            if (want := _wrong_type(known[key], value)) is not None:
                raise InputError(f"{key} must be {want}, not {type(value).__name__} {value!r}", args.config, lines.get(key))
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
    # The CLI keeps transformers' logger at error level, from which TrainingArguments would infer disable_tqdm:
    # say it outright, so a run shows Trainer's progress bar (with ETA) and its loss lines unless --quiet.
    values["disable_tqdm"] = True if args.quiet else values.get("disable_tqdm", False)
    values["output_dir"] = args.output
    from .generate import launched_processes

    if launched_processes() == "cpu":
        values.setdefault("use_cpu", True)  # several CPU processes (gloo): without it each would train alone
    try:
        config = DertaConfig(**values)
    except (TypeError, ValueError) as e:
        raise InputError(f"bad training setting: {str(e).splitlines()[0]}", args.config) from None
    except ImportError as e:  # e.g. a deepspeed config without deepspeed installed
        raise InputError(f"the config needs a package that is not installed: {str(e).splitlines()[0]}", args.config) from None
    if config.loss_impl not in ("chunked", "full"):
        raise InputError(f"unknown loss_impl '{config.loss_impl}': use chunked or full", args.config)
    check_ranges(config, set(values), args.config)
    return config


def run_from_cli(args) -> Path:
    return train(config_from_cli(args), args.model, args.data, resume=args.resume, dtype=args.dtype)
