"""The DPO baseline (`data build --recipe dpo`): derta's rows as TRL's tokenized examples, and TRL's DPOTrainer
on derta's settings."""

from __future__ import annotations

from dataclasses import fields

from transformers import TrainingArguments

from derta.data.tokenize import IGNORE, tokenize_row
from derta.io import InputError
from derta.train.config import DertaConfig
from derta.train.trainer import CompleteCheckpoints


def dpo_examples(rows: list[dict], tokenizer, config: DertaConfig, data_path=None) -> list[dict]:
    """TRL's `prompt_ids` / `chosen_ids` / `rejected_ids` from derta rows, tokenized as every other recipe's.

    Pair rows: chosen = the refusal (written with the tokenizer's refusal transition), rejected = the harmful
    response, both after the same prompt and ending with the end of turn. Helpful rows: chosen = rejected =
    the response; their DPO margin is 0 whatever the model does (no gradient), so only the SFT term trains them.
    """
    out = []
    for row in rows:
        if row["kind"] not in ("pair", "helpful"):
            raise InputError(
                f"a DPO data file (data build --recipe dpo) holds pair and helpful rows, not '{row['kind']}'",
                data_path,
                row.get("_line"),
            )
        tok = (
            row
            if "input_ids" in row and (row["kind"] != "pair" or "rejected_input_ids" in row)
            else tokenize_row(row, tokenizer, config.template, config.refusal_phrase)
        )
        ids = tok["input_ids"] + tok.get("rejected_input_ids", [])
        if max(ids) >= len(tokenizer):
            raise InputError(
                f"token id {max(ids)} is outside this model's vocabulary ({len(tokenizer)}): the rows were "
                "tokenized for another model",
                data_path,
                row.get("_line"),
            )
        n = next(i for i, x in enumerate(tok["labels"]) if x != IGNORE)  # where the response starts
        chosen = tok["input_ids"][n:]
        out.append(
            {
                "prompt_ids": tok["input_ids"][:n],
                "chosen_ids": chosen,
                "rejected_ids": tok["rejected_input_ids"][n:] if row["kind"] == "pair" else chosen,
            }
        )
    return out


def dpo_trainer(config: DertaConfig, model, tokenizer, examples: list[dict], callbacks: list):
    """TRL's DPOTrainer (sigmoid DPO loss + dpo_sft_weight x the chosen side's NLL) on derta's settings and rows."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    class DertaDPOTrainer(CompleteCheckpoints, DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized by derta (exact seams), not re-tokenized from text by TRL

    shared = {f.name: getattr(config, f.name) for f in fields(TrainingArguments) if f.init}
    args = DPOConfig(
        **shared,
        beta=config.dpo_beta,
        loss_type=["sigmoid", "sft"],
        loss_weights=[1.0, config.dpo_sft_weight],
        max_length=config.max_length,
    )
    # With LoRA, TRL's reference is a frozen copy of the fresh adapter (= the base model); else a frozen model copy.
    return DertaDPOTrainer(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
