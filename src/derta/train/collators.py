"""Batches for DertaTrainer: padded (PadCollator) or packed into one sequence (PackCollator), and the dataset
that re-draws each RTO row's trained positions every epoch (EpochRows)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from derta.data.tokenize import IGNORE, sample_rto_labels


@dataclass
class PadCollator:
    """Right-pads input_ids (pad id) and labels (-100); passes each row's loss weight and kind (`reroute`: also
    which rows are circuit-breaker `reroute` rows, for train.circuit)."""

    pad_token_id: int
    reroute: bool = False

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
        out = {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "loss_weight": torch.tensor([float(r.get("loss_weight", 1.0)) for r in rows]),
            "is_rto": torch.tensor([r["kind"] == "rto" for r in rows]),
        }
        if self.reroute:
            out["is_reroute"] = torch.tensor([r["kind"] == "reroute" for r in rows])
        return out


@dataclass
class PackCollator:
    """Concatenates the rows of a batch into one sequence with per-row position_ids (no padding, no mask).

    The attention layers see where a row starts from position_ids going back to 0. loss_weight and
    is_rto (and with `reroute`, is_reroute) become per-token so each token keeps its own row's values.
    """

    reroute: bool = False

    def __call__(self, rows: list[dict]) -> dict:
        ids, labels, positions, weight, is_rto, is_reroute = [], [], [], [], [], []
        for r in rows:
            n = len(r["input_ids"])
            ids += r["input_ids"]
            # The first token of a row must not be the target of the previous row's last position.
            labels += [IGNORE] + list(r["labels"][1:])
            positions += range(n)
            weight += [float(r.get("loss_weight", 1.0))] * n
            is_rto += [r["kind"] == "rto"] * n
            is_reroute += [r["kind"] == "reroute"] * n
        out = {
            "input_ids": torch.tensor([ids]),
            "position_ids": torch.tensor([positions]),
            "labels": torch.tensor([labels]),
            "loss_weight": torch.tensor([weight]),
            "is_rto": torch.tensor([is_rto]),
        }
        if self.reroute:
            out["is_reroute"] = torch.tensor([is_reroute])
        return out


# Attention implementations that read packed-sequence boundaries from position_ids in transformers 5.
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


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
