"""Training data recipes: vanilla safety tuning, harmful-prefix MLE, RTO, and DeRTa (both).

A safety triple is (instruction q, harmful response r̂, safe response r). Recipes turn each
triple into training rows; helpful (instruction, response) rows pass through unchanged:

    vanilla -> safe              (q -> r)
    prefix  -> prefix            (q + r̂<k -> r), k = 0 for about `no_prefix_ratio` of rows
    rto     -> safe + rto        (q + r̂, refusal token trained after every position)
    derta   -> prefix + rto

A row is text first (`kind`, `instruction`, `prefix`, `target`); `tokenize_row` turns it into
`input_ids`/`labels` segment by segment, so the loss boundary is exactly where the text says.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

from .io import InputError, check_fields, read_jsonl
from .models import encode_prompt, encode_text, format_prompt

RECIPES = {
    "vanilla": ("safe",),
    "prefix": ("prefix",),
    "rto": ("safe", "rto"),
    "derta": ("prefix", "rto"),
}
KINDS = ("helpful", "safe", "prefix", "rto")
SAFETY_FIELDS = ("instruction", "harmful_response", "safe_response")
HELPFUL_FIELDS = ("instruction", "response")
IGNORE = -100  # Hugging Face's "no loss here" label


@dataclass
class RecipeConfig:
    recipe: str = "derta"
    seed: int = 42
    no_prefix_ratio: float = 0.33
    cut: str = "word"  # "word" (word boundaries) or "token" (needs a tokenizer)
    refusal_phrase: str = "Sorry"
    rto_keep_ratio: float = 1.0  # fraction of RTO positions trained (the reference's 8B run kept ~5 %)
    rto_weight: float = 1.0  # loss weight of RTO tokens relative to MLE tokens
    template: str = "auto"

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe '{self.recipe}': use one of {', '.join(RECIPES)}")
        if self.cut not in ("word", "token"):
            raise InputError(f"unknown cut '{self.cut}': use word or token")
        if not 0.0 <= self.no_prefix_ratio <= 1.0:
            raise InputError("--no-prefix-ratio must be between 0 and 1")
        if not 0.0 < self.rto_keep_ratio <= 1.0:
            raise InputError("--rto-keep-ratio must be in (0, 1]")
        if self.rto_weight < 0:
            raise InputError("--rto-weight must be >= 0")


# ---------------------------------------------------------------- loading inputs


def parse_mapping(spec: str | None) -> dict[str, str]:
    """`instruction=prompt,response=chosen` -> {"instruction": "prompt", "response": "chosen"}."""
    if not spec:
        return {}
    mapping = {}
    for part in spec.split(","):
        ours, _, theirs = part.partition("=")
        if not ours.strip() or not theirs.strip():
            raise InputError(f"bad column mapping '{part}': use ours=theirs,...")
        mapping[ours.strip()] = theirs.strip()
    return mapping


def load_rows(source: str, required: tuple[str, ...], mapping: dict[str, str] | None = None, kind: str = "row") -> list[dict]:
    """Rows from a JSONL file, or from a `datasets` name/path (`NAME` or `NAME:SPLIT`).

    `mapping` renames source columns to ours (ours=theirs), e.g. instruction=prompt.
    """
    mapping = mapping or {}
    path = Path(source)
    if path.suffix in (".jsonl", ".json") or path.is_file():
        records = read_jsonl(path, kind=kind, with_lines=True)
    else:
        records = [(i, r) for i, r in enumerate(_load_hf(source), 1)]
    rows = []
    for lineno, r in records:
        row = dict(r)
        for ours, theirs in mapping.items():
            if theirs not in row:
                raise InputError(f"{kind} has no column '{theirs}' (mapped to '{ours}')", source, lineno)
            row[ours] = row.pop(theirs)
        check_fields(row, required, source, lineno, kind)
        rows.append(row)
    if not rows:
        raise InputError("dataset has no rows", source)
    return rows


def _load_hf(source: str) -> list[dict]:
    name, _, split = source.partition(":")
    try:
        import datasets

        if Path(name).is_dir() and (Path(name) / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split or "train")
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split or "train"]
    except Exception as e:  # datasets raises many types; the user needs one line
        raise InputError(f"cannot load dataset: {str(e).splitlines()[0] if str(e) else type(e).__name__}", source) from None
    return [dict(r) for r in ds]


# ---------------------------------------------------------------- recipes


def word_cut(text: str, k: int) -> str:
    """The first k whitespace-separated words of `text`, with their inner spacing and no trailing whitespace."""
    if k <= 0:
        return ""
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[: ends[min(k, len(ends)) - 1]]


def token_cut(tokenizer, text: str, k: int) -> str:
    """The text of the first k tokens, backed off to a clean character boundary, trailing whitespace dropped."""
    ids = encode_text(tokenizer, text)
    k = min(k, len(ids))
    while k > 0:
        piece = tokenizer.decode(ids[:k])
        if "\ufffd" not in piece[-1:] and text.startswith(piece):
            return piece.rstrip()
        k -= 1
    return ""


def _cut_points(cfg: RecipeConfig, text: str, tokenizer) -> int:
    """How many units (words or tokens) the harmful response has."""
    if cfg.cut == "token":
        return len(encode_text(tokenizer, text))
    return len(text.split())


def build_rows(cfg: RecipeConfig, safety: list[dict], helpful: list[dict], tokenizer=None) -> list[dict]:
    """Text rows for a recipe: one row per helpful example, 1 or 2 per safety triple (see module doc)."""
    if cfg.cut == "token" and tokenizer is None:
        raise InputError("--cut token needs --tokenizer")
    rng = random.Random(cfg.seed)
    kinds = RECIPES[cfg.recipe]
    # Exactly round(ratio * n) prefix rows get k = 0, chosen by the seed.
    n_prefix = len(safety) if "prefix" in kinds else 0
    no_prefix = set(rng.sample(range(n_prefix), round(cfg.no_prefix_ratio * n_prefix))) if n_prefix else set()

    rows = [
        {**_extras(h, HELPFUL_FIELDS), "kind": "helpful", "instruction": h["instruction"], "prefix": "", "target": h["response"]}
        for h in helpful
    ]
    for i, t in enumerate(safety):
        extras = _extras(t, SAFETY_FIELDS)
        for kind in kinds:
            row = {**extras, "kind": kind, "instruction": t["instruction"], "prefix": "", "target": t["safe_response"]}
            if kind == "prefix":
                units = _cut_points(cfg, t["harmful_response"], tokenizer)
                # A response too short to cut (< 2 units) keeps k = 0 rather than being dropped.
                k = 0 if (i in no_prefix or units < 2) else rng.randint(1, units - 1)
                cut = token_cut(tokenizer, t["harmful_response"], k) if cfg.cut == "token" else word_cut(t["harmful_response"], k)
                if cut:
                    # The separator belongs to the target: a prefix ending in whitespace would let the
                    # model learn "lone space -> Sorry" instead of the transition itself.
                    row["prefix"], row["target"] = cut, " " + t["safe_response"].lstrip()
            elif kind == "rto":
                row["target"] = t["harmful_response"]
            rows.append(row)
    return rows


def _extras(row: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in known and k not in ("kind", "prefix", "target", "input_ids", "labels")}


# ---------------------------------------------------------------- tokenization


def tokenize_row(row: dict, tokenizer, refusal_id: int, template: str = "auto",
                 rto_keep_ratio: float = 1.0, rto_weight: float = 1.0, rng: random.Random | None = None) -> dict:
    """input_ids and labels (unshifted, -100 where no loss) for one text row.

    MLE rows (helpful, safe, prefix): prompt + prefix + target + EOS; loss on target + EOS.
    rto rows: prompt + harmful response + EOS; the label at each of those |r̂|+1 positions is
    the refusal token, so the logits from the end of the prompt through the last harmful token
    all point at it.
    """
    template = row.get("template", template)
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["instruction"], template), template)
    prefix = encode_text(tokenizer, row.get("prefix", ""))
    target = encode_text(tokenizer, row["target"])
    eos = tokenizer.eos_token_id
    if row["kind"] == "rto":
        input_ids = prompt + prefix + target + [eos]
        n = len(target) + 1
        keep = list(range(n))
        if rto_keep_ratio < 1.0:
            keep = sorted((rng or random.Random(0)).sample(keep, max(1, round(rto_keep_ratio * n))))
        response_labels = [IGNORE] * n
        for j in keep:
            response_labels[j] = refusal_id
        labels = [IGNORE] * (len(prompt) + len(prefix)) + response_labels
        weight = rto_weight
    else:
        input_ids = prompt + prefix + target + [eos]
        labels = [IGNORE] * (len(prompt) + len(prefix)) + target + [eos]
        weight = 1.0
    return {"input_ids": input_ids, "labels": labels, "loss_weight": weight}


def tokenize_rows(rows: list[dict], tokenizer, cfg: RecipeConfig, refusal_id: int) -> list[dict]:
    rng = random.Random(cfg.seed + 1)
    return [
        {**row, **tokenize_row(row, tokenizer, refusal_id, cfg.template, cfg.rto_keep_ratio, cfg.rto_weight, rng)}
        for row in rows
    ]


# ---------------------------------------------------------------- reading built rows back (for training)


def from_reference_row(row: dict) -> dict:
    """A row in the reference repository's format {"prefix", "text", "safe"} as one of ours.

    There `prefix` is the full formatted prompt (plus any harmful prefix), `text` the trained
    response ending in a literal EOS string, and safe == "true" marks an RTO row.
    """
    text = re.sub(r"(<\|end_of_text\|>|<\|eot_id\|>|</s>)\s*$", "", row["text"])
    rto = str(row.get("safe", "false")).lower() == "true"
    return {"kind": "rto" if rto else "helpful", "instruction": row["prefix"], "prefix": "", "target": text, "template": "raw"}


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
            if not (isinstance(ids, list) and isinstance(labels, list) and all(isinstance(x, int) for x in ids + labels)):
                raise InputError("input_ids and labels must both be lists of integers", path, lineno)
            if len(ids) != len(labels):
                raise InputError(f"input_ids ({len(ids)}) and labels ({len(labels)}) differ in length", path, lineno)
            if all(x == IGNORE for x in labels):
                raise InputError("row has no trained token (every label is -100)", path, lineno)
        else:
            check_fields(r, ("instruction", "target"), path, lineno)
            if not isinstance(r.get("prefix", ""), str):
                raise InputError("field 'prefix' must be a string", path, lineno)
        rows.append({**r, "_line": lineno})  # for messages about the row found later (e.g. vocabulary)
    return rows
