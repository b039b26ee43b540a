"""DertaTrainer (Trainer with derta's loss and per-objective logs), and checkpoints that are known complete.

Each checkpoint ends with derta_state.json, written last: `--resume` skips (and renames) checkpoints a kill or
a full disk cut short, and the run's train_loss covers every step, before and after a resume.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from derta.io import InputError, write_json
from derta.models.loading import describe_nonfinite, nonfinite_tensors, safetensors_problem
from derta.models.precision import cpu_autocast, resolve_cpu_bf16
from derta.train.losses import batch_loss
from derta.train.trunk import TrunkCache, trunk_start


class CompleteCheckpoints:
    """Trainer mixin: each checkpoint ends with derta_state.json, so `--resume` can tell a complete one."""

    # The loss summed over the steps before this train() call (from the resumed checkpoint's derta_state.json):
    # Trainer's own train_loss averages only the steps after a resume.
    loss_sum_before = 0.0

    def _save_checkpoint(self, model, trial) -> None:
        # A checkpoint of non-finite weights would be resumed from, or taken for a model: stop before writing it.
        if bad := nonfinite_tensors(self.model):
            raise InputError(
                f"training stopped at step {self.state.global_step}: after its update {describe_nonfinite(bad)}; "
                "this checkpoint is not saved (lower the learning rate; the checkpoints already in the output "
                "directory are from before)"
            )
        super()._save_checkpoint(model, trial)
        # Written last, atomically: a checkpoint without it was cut short (killed or disk full mid-save).
        if self.args.should_save:
            ckpt = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            write_json(
                ckpt / CHECKPOINT_MARKER,
                {
                    "step": self.state.global_step,
                    "loss_sum": self.loss_sum_before + self._total_loss_scalar + float(self._tr_loss),
                },
            )


def uses_cpu_bf16(args) -> bool:
    """Whether a trainer runs its forward passes under bf16 autocast on the CPU (`cpu_bf16`); under Trainer's own
    mixed precision (--bf16, --fp16) that one rules."""
    return not (args.bf16 or args.fp16) and resolve_cpu_bf16(getattr(args, "cpu_bf16", "off"), args.device)


class DertaTrainer(CompleteCheckpoints, Trainer):
    """Trainer whose loss is Σ w·NLL over labelled tokens / (number of labelled tokens)."""

    def __init__(self, *args, reference_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts = {"mle": [0.0, 0], "rto": [0.0, 0], "rto_hit": [0.0, 0], "constraint": [0.0, 0]}
        # The constrained objective's reference (--constrain-to): frozen, on the training device.
        self.reference_model = reference_model
        self.cpu_bf16 = uses_cpu_bf16(self.args)
        if reference_model is not None:
            reference_model.requires_grad_(False).eval().to(self.args.device)
        self.trunk, self.trunk_off = None, ""
        if getattr(self.args, "trunk_cache_gb", 0) > 0:
            self.trunk, self.trunk_off = _trunk_cache(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The chunked loss calls the decoder body itself, past the autocast accelerate wraps around
        # model.forward for mixed precision, so it enters that autocast here (a no-op in fp32).
        with self.accelerator.autocast(), cpu_autocast(self.cpu_bf16):
            loss, parts = batch_loss(
                model,
                inputs,
                getattr(self.args, "loss_impl", "chunked"),
                num_items_in_batch,
                self.reference_model,
                getattr(self.args, "constraint_beta", 0.1),
                self.trunk if model is self.model else None,  # not through DDP / FSDP / DeepSpeed wrappers
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch is then the label count of all processes, and DDP / FSDP / DeepSpeed average
            # the gradients over them: scale back up, as Trainer.compute_loss does, so that the loss and its
            # gradients are Σ w·NLL / (labels of the whole step) on any number of processes.
            loss = loss * (
                self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu
            )
        if not getattr(self.args, "allow_nonfinite_loss", False) and not torch.isfinite(loss.detach()).all():
            # Stop before this step's update reaches the weights: checkpoints already written are finite,
            # and no final model is saved (a NaN model with exit 0 is the worst outcome).
            raise InputError(
                f"training stopped at step {self.state.global_step + 1}: the loss is {loss.item()}; lower "
                "the learning rate or check loss weights (the last checkpoint in the output directory is "
                "from before it; allow_nonfinite_loss: true in --config goes on regardless)"
            )
        for name, (total, count) in parts.items():
            self._parts[name][0] += total
            self._parts[name][1] += count
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        # Per-token averages since the last log, so the two objectives can be watched apart; summed over
        # all processes (every process logs at the same step, the main one prints and writes).
        if "loss" in logs:
            names = {"mle": "mle_loss", "rto": "rto_loss", "rto_hit": "rto_accuracy", "constraint": "constraint_weight"}
            sums = torch.tensor(
                [x for part in self._parts.values() for x in part], dtype=torch.float64, device=self.args.device
            )
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


def _trunk_cache(trainer) -> tuple[TrunkCache | None, str]:
    """The frozen trunk's cache for this run, or (None, why not)."""
    args = trainer.args
    if args.world_size > 1 or trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        return None, "more than one process, or DeepSpeed / FSDP"
    if getattr(args, "loss_impl", "chunked") == "full":
        return None, "loss_impl full"
    start, why = trunk_start(trainer.model)
    return (TrunkCache(start, int(args.trunk_cache_gb * 2**30)), "") if start is not None else (None, why)


def trunk_record(trainer) -> dict:
    """derta_train.json's trunk_cache: whether the frozen layers' states were reused, how much, or why not."""
    if not hasattr(trainer, "trunk"):
        return {"used": False, "off": "DPO and Circuit Breakers run the whole model"}
    if trainer.trunk is not None:
        return trainer.trunk.summary()
    return {"used": False, "off": trainer.trunk_off or "trunk_cache_gb 0"}


CHECKPOINT_MARKER = "derta_state.json"


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is complete); cheap: headers, not tensors."""

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

    found = sorted(
        (p for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    broken = []
    for ckpt in found:
        problem = checkpoint_problem(ckpt)
        if problem is None:
            break
        aside = ckpt.with_name(f"incomplete-{ckpt.name}")
        if aside.exists():
            shutil.rmtree(aside)
        ckpt.rename(aside)
        broken.append(f"{ckpt.name} ({problem})")
    else:
        ckpt = None
    if broken:
        where = f"resuming from {ckpt.name}" if ckpt else "no complete checkpoint left, starting from the beginning"
        print(f"derta: incomplete checkpoint {', '.join(broken)} renamed incomplete-*; {where}", file=sys.stderr)
    return str(ckpt) if ckpt else None
