"""Text rows to training rows: input_ids and labels, segment by segment, and what a set of rows trains.

A text row (`data.recipes`) becomes prompt + prefix + target + end of turn, each segment encoded on its own so
the loss boundary is exactly where the text says; refusals start with the tokenizer's refusal transition
(`models.refusal_tokens`). Built rows are read back (`load_training_rows`) strictly, from `data build` or the
reference repository's format. Labelled-token shares per objective are reported and RTO's can be capped.
"""

from __future__ import annotations

import functools
import random
import re

from tqdm import tqdm

from derta.data.recipes import CE_KINDS, KINDS, RecipeConfig
from derta.io import InputError, check_fields, check_number, read_jsonl, show_progress
from derta.models.refusal_tokens import (
    REFUSAL_PHRASE,
    REFUSAL_TOKEN_MODES,
    REFUSE_TOKEN,
    RESET_TOKEN,
    RESPOND_TOKEN,
    add_special_tokens,
    refusal_text,
    refusal_transition,
    refuse_token,
)
from derta.models.templates import encode_prompt, encode_text, end_of_turn_ids, format_prompt, resolve_template

IGNORE = -100  # Hugging Face's "no loss here" label


@functools.lru_cache(maxsize=32)
def _turn_parts(tokenizer, template: str, phrase: str):
    return end_of_turn_ids(tokenizer, template), refusal_transition(tokenizer, phrase)


def tokenize_row(
    row: dict, tokenizer, template: str = "auto", refusal_phrase: str = REFUSAL_PHRASE, rto_weight: float = 1.0
) -> dict:
    """input_ids and labels (unshifted, -100 where no loss) for one text row; settings the row carries win.

    MLE rows (helpful, safe, prefix; pair: its chosen side): prompt + prefix + target + end of turn; loss on target and the
    end-of-turn token(s) the chat template writes (not necessarily eos). Refusal targets start with
    the refusal transition: its start form at the start of a response, its mid form after a prefix.
    rto rows: prompt + harmful response + end of turn; the labels at those |r̂|+1 positions are the
    transition token for that position (start form first, then mid form), so the logits from the
    end of the prompt through the last harmful token all point at a refusal. Every position is
    labelled here; `rto_keep_ratio` (carried in the row) is applied by the trainer, afresh each epoch.
    """

    template = resolve_template(tokenizer, row.get("template", template))
    phrase = row.get("refusal_phrase", refusal_phrase)
    eot, transition = _turn_parts(tokenizer, template, phrase)
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["instruction"], template), template)
    prefix = encode_text(tokenizer, row.get("prefix", ""))
    text = row["target"]
    if row["kind"] in ("safe", "prefix", "pair", "backtrack"):
        # After [RESET] the response starts over: the refusal's start form, as at the start of a response.
        mid = row.get("prefix") and row_marker(row) != RESET_TOKEN
        text = refusal_text(text, transition.mid_text if mid else transition.start_text, phrase)
    marker = row_marker_id(row, tokenizer)  # [respond] / [refuse...] / [RESET] in front of the target, or None
    target = ([] if marker is None or row["kind"] == "rto" else [marker]) + encode_text(tokenizer, text)
    input_ids = prompt + prefix + target + eot
    context = [IGNORE] * (len(prompt) + len(prefix))
    if row["kind"] == "rto":
        n = len(target) + 1
        if marker is not None:  # the refusal token at every position: one decision token, start and mid-response
            first = mid = marker
        else:
            first, mid = transition.mid_id if prefix else transition.start_id, transition.mid_id
        labels = context + [first] + [mid] * (n - 1) + [IGNORE] * (len(eot) - 1)
        weight = row.get("loss_weight", rto_weight)
    else:  # reroute rows: labels mark the harmful response, whose hidden states train (train.circuit), no NLL
        labels = context + target + eot
        weight = row.get("loss_weight", 1.0)
    out = {"input_ids": input_ids, "labels": labels, "loss_weight": weight}
    if row["kind"] == "pair":
        # DPO: input_ids/labels are the chosen (refusal) response; the rejected (harmful) one follows the same prompt.
        # With a prefix (backtrack-dpo) both sides continue it: [RESET] + refusal, or the rest of the harmful response.
        rejected = encode_text(tokenizer, row["rejected"])
        out.update(rejected_input_ids=prompt + prefix + rejected + eot, rejected_labels=context + rejected + eot)
    return out


def row_marker(row: dict) -> str | None:
    """The special token a row's target starts with (RTO: its label everywhere), or None without refusal tokens;
    a backtrack row's target starts with `[RESET]`."""
    if row["kind"] == "backtrack" or row.get("reset"):
        return RESET_TOKEN
    mode = row.get("refusal_tokens", "none")
    if mode == "none":
        return None
    if row["kind"] == "helpful":
        return RESPOND_TOKEN
    return refuse_token(row.get("category")) if mode == "category" else REFUSE_TOKEN


def row_marker_id(row: dict, tokenizer) -> int | None:
    token = row_marker(row)
    if token is None:
        return None
    found = tokenizer.get_added_vocab().get(token)
    if found is None:
        raise InputError(
            f"the tokenizer has no {token} token: add the rows' tokens first (data.refusal_token_list, "
            "models.add_special_tokens); derta train and data build --tokenizer do this"
        )
    return found


def refusal_token_list(rows: list[dict]) -> list[str]:
    """The special tokens rows need, in a fixed order (the same rows give the same ids): `[RESET]` for backtrack
    rows; with --refusal-tokens `[respond]`, `[refuse]` (single mode, or a refusal without a category), then
    `[refuse:CATEGORY]` by name."""
    if any(r["kind"] == "backtrack" or r.get("reset") for r in rows):
        return [RESET_TOKEN]  # data.recipes refuses --refusal-tokens for the backtrack recipe
    modes = {r.get("refusal_tokens", "none") for r in rows} - {"none"}
    if not modes:
        return []
    if len(modes) > 1:
        raise InputError(f"rows mix --refusal-tokens modes ({', '.join(sorted(modes))}): build them with one")
    tokens = {row_marker(r) for r in rows if r.get("refusal_tokens", "none") != "none"}
    refuse = sorted(t for t in tokens if t not in (RESPOND_TOKEN, REFUSE_TOKEN))
    return [RESPOND_TOKEN] + ([REFUSE_TOKEN] if REFUSE_TOKEN in tokens else []) + refuse


def tokenize_rows(rows: list[dict], tokenizer, cfg: RecipeConfig) -> list[dict]:
    # A progress bar for large sets on a terminal (tens of thousands of rows take minutes).
    quiet = len(rows) < 2000 or not show_progress()
    return [
        {**row, **tokenize_row(row, tokenizer, cfg.template, cfg.refusal_phrase, cfg.rto_weight)}
        for row in tqdm(rows, desc="tokenizing", unit="row", disable=quiet)
    ]


def tokenize_for_training(
    rows: list[dict], tokenizer, cfg: RecipeConfig, max_rto_share: float | None = None
) -> tuple[list[dict], list[str], float | None]:
    """(tokenized rows, special tokens added to `tokenizer`, RTO's new keep ratio or None).

    The rows' refusal tokens join the tokenizer first, in the order derta train adds them to the model's,
    so the ids match; then RTO is capped at `max_rto_share` of the labelled tokens (`cap_rto_share`).
    """
    added = add_special_tokens(tokenizer, refusal_token_list(rows))
    rows = tokenize_rows(rows, tokenizer, cfg)
    ratio = cap_rto_share(rows, max_rto_share) if max_rto_share is not None else None
    return rows, added, ratio


def sample_rto_labels(labels: list[int], keep_ratio: float, rng: random.Random) -> list[int]:
    """An RTO row's labels with only `keep_ratio` of its labelled positions kept (at least one)."""
    positions = [j for j, x in enumerate(labels) if x != IGNORE]
    if keep_ratio >= 1.0 or not positions:
        return labels
    keep = set(rng.sample(positions, max(1, round(keep_ratio * len(positions)))))
    return [x if j in keep else IGNORE for j, x in enumerate(labels)]


# Above this share of all labelled tokens, RTO drowned the other objectives in a real run (SmolLM2:
# 63 % RTO tokens -> "SorrySorry..." loops); the paper's mix puts it at a few percent.
RTO_SHARE_WARN = 0.25


def label_token_counts(rows: list[dict]) -> dict[str, float]:
    """Labelled tokens per objective (kind), RTO rows counted at their expected kept share."""
    counts = {k: 0.0 for k in CE_KINDS if k != "backtrack"}  # the others are listed only where there are some
    for r in rows:
        n = sum(x != IGNORE for x in r["labels"])
        counts[r["kind"]] = counts.get(r["kind"], 0.0) + n * (
            r.get("rto_keep_ratio", 1.0) if r["kind"] == "rto" else 1.0
        )
    return counts


def label_token_shares(rows: list[dict], every_kind: bool = False) -> dict[str, float]:
    """Each objective's share of all labelled tokens, RTO rows at their keep ratio; the kinds with none are left out
    unless `every_kind`."""
    counts = label_token_counts(rows)
    total = sum(counts.values()) or 1.0
    return {k: round(v / total, 4) for k, v in counts.items() if v or every_kind}


def cap_rto_share(rows: list[dict], max_share: float) -> float | None:
    """Lower every RTO row's keep ratio so RTO is at most `max_share` of labelled tokens; the new ratio, or None."""
    counts = label_token_counts(rows)
    rto, other = counts["rto"], sum(v for k, v in counts.items() if k != "rto")
    if rto <= max_share * (rto + other):
        return None
    scale = max_share * other / ((1.0 - max_share) * rto)
    ratio = None
    for r in rows:
        if r["kind"] == "rto":
            r["rto_keep_ratio"] = ratio = round(r.get("rto_keep_ratio", 1.0) * scale, 6)
    return ratio


def describe_shares(rows: list[dict]) -> str:
    """One line of labelled-token shares, warning-worthy or not."""
    shares = label_token_shares(rows)
    line = "labelled-token shares: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items())
    if shares.get("rto", 0.0) > RTO_SHARE_WARN:
        line += (
            f" -- warning: RTO is {100 * shares['rto']:.0f}% of labelled tokens (> {100 * RTO_SHARE_WARN:.0f}%); "
            "lower --rto-keep-ratio or set --max-rto-share (the model may loop on the refusal token)"
        )
    return line


def from_reference_row(row: dict) -> dict:
    """A row in the reference repository's format {"prefix", "text", "safe"} as one of ours.

    There `prefix` is the full formatted prompt (plus any harmful prefix), `text` the trained
    response ending in a literal EOS string, and safe == "true" marks an RTO row.
    """
    text = re.sub(r"(<\|end_of_text\|>|<\|eot_id\|>|</s>)\s*$", "", row["text"])
    rto = str(row.get("safe", "false")).lower() == "true"
    return {
        "kind": "rto" if rto else "helpful",
        "instruction": row["prefix"],
        "prefix": "",
        "target": text,
        "template": "raw",
    }


def load_training_rows(path: str) -> list[dict]:
    """Rows of a `data build` output (text or tokenized), or of the reference format, validated.

    Each row carries its line number as `_line`.
    """
    rows = []
    for lineno, r in read_jsonl(path, with_lines=True):
        if "kind" not in r and {"prefix", "text"} <= r.keys():
            check_fields(r, ("prefix", "text"), path, lineno)
            r = from_reference_row(r)
        if r.get("kind") not in KINDS:
            raise InputError(f"field 'kind' must be one of {', '.join(KINDS)}", path, lineno)
        if "input_ids" in r or "labels" in r:
            ids, labels = r.get("input_ids"), r.get("labels")
            if not (
                isinstance(ids, list) and isinstance(labels, list) and all(isinstance(x, int) for x in ids + labels)
            ):
                raise InputError("input_ids and labels must both be lists of integers", path, lineno)
            if len(ids) != len(labels):
                raise InputError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length", path, lineno)
            if all(x == IGNORE for x in labels):
                raise InputError("row has no trained token (every label is -100)", path, lineno)
            if min(ids, default=0) < 0 or any(x < 0 and x != IGNORE for x in labels):
                raise InputError("negative token id (only labels may be -100)", path, lineno)
        else:
            check_fields(r, ("instruction", "target"), path, lineno)
            if not isinstance(r.get("prefix", ""), str):
                raise InputError("field 'prefix' must be a string", path, lineno)
        for key in ("refusal_phrase", "template"):
            if key in r and not (isinstance(r[key], str) and r[key].strip()):
                raise InputError(f"field '{key}' must be a non-empty string", path, lineno)
        if r.get("refusal_tokens", "none") not in REFUSAL_TOKEN_MODES:
            raise InputError(f"field 'refusal_tokens' must be one of {', '.join(REFUSAL_TOKEN_MODES)}", path, lineno)
        for key, rule in (("loss_weight", "nonneg"), ("rto_keep_ratio", "ratio")):
            if key in r:
                check_number(r[key], f"field '{key}'", rule, path, lineno)
        rows.append({**r, "_line": lineno})  # for messages about the row found later (e.g. vocabulary)
    return rows
