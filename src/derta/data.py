"""Training data recipes: vanilla safety tuning, harmful-prefix MLE, RTO, and DeRTa (both).

A safety triple is (instruction q, harmful response r̂, safe response r). Recipes turn each
triple into training rows; helpful (instruction, response) rows pass through unchanged:

    vanilla -> safe              (q -> r)
    prefix  -> prefix            (q + r̂<k -> r), k = 0 for about `no_prefix_ratio` of rows
    rto     -> safe + rto        (q + r̂, refusal token trained after every position)
    derta   -> prefix + rto
    recovery-> prefix            Qi et al.'s safety recovery rows: half get k ~ U{1..min(100, |r̂|)}, half k = 0
    dpo     -> pair              a preference pair (chosen r, rejected r̂), trained with TRL's DPOTrainer

A row is text first (`kind`, `instruction`, `prefix`, `target`); `tokenize_row` turns it into
`input_ids`/`labels` segment by segment, so the loss boundary is exactly where the text says.

With refusal tokens (`refusal_tokens`: single or category, after Jain et al., 2024) every helpful target
starts with `[respond]` and every refusal with `[refuse]` / `[refuse:CATEGORY]`, and RTO trains that same
token at every position of the harmful response: one decision token, at the start and mid-response,
whose probability `derta calibrate` thresholds per category.
"""

from __future__ import annotations

import functools
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

from .io import InputError, check_fields, check_number, read_jsonl
from .models import (REFUSAL_TOKEN_MODES, REFUSE_TOKEN, RESPOND_TOKEN, end_of_turn_ids, encode_prompt,
                     encode_text, format_prompt, refuse_token, refusal_text, refusal_transition)

RECIPES = {
    "vanilla": ("safe",),
    "prefix": ("prefix",),
    "rto": ("safe", "rto"),
    "derta": ("prefix", "rto"),
    # Baselines (docs/baselines.md): Qi et al.'s safety recovery examples, and DPO on the same triples.
    "recovery": ("prefix",),
    "dpo": ("pair",),
}
KINDS = ("helpful", "safe", "prefix", "rto", "pair")
# Qi et al. (shallow-vs-deep-alignment): prefixes of at most 100 harmful tokens, on half of the safety rows.
RECOVERY_MAX_PREFIX = 100
RECOVERY_SHARE = 0.5
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
    rto_keep_ratio: float = 1.0  # fraction of RTO positions trained, drawn afresh each epoch (reference 8B run: ~5 %)
    rto_weight: float = 1.0  # loss weight of RTO tokens relative to MLE tokens
    template: str = "auto"
    max_rto_share: float | None = None  # cap on RTO's share of labelled tokens (lowers rto_keep_ratio; needs tokens)
    refusal_tokens: str = "none"  # none | single ([refuse]) | category ([refuse:CATEGORY] from each triple's category)

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise InputError(f"unknown recipe '{self.recipe}': use one of {', '.join(RECIPES)}")
        if self.cut not in ("word", "token"):
            raise InputError(f"unknown cut '{self.cut}': use word or token")
        if not 0.0 <= self.no_prefix_ratio <= 1.0:
            raise InputError("--no-prefix-ratio must be between 0 and 1")
        if not 0.0 < self.rto_keep_ratio <= 1.0:
            raise InputError("--rto-keep-ratio must be in (0, 1]")
        if not (math.isfinite(self.rto_weight) and self.rto_weight >= 0):
            raise InputError("--rto-weight must be a finite number >= 0")
        if self.max_rto_share is not None and not 0.0 < self.max_rto_share < 1.0:
            raise InputError("--max-rto-share must be in (0, 1)")
        if not self.refusal_phrase.split():
            raise InputError("--refusal-phrase must not be empty")
        if self.refusal_tokens not in REFUSAL_TOKEN_MODES:
            raise InputError(f"unknown --refusal-tokens '{self.refusal_tokens}': use one of {', '.join(REFUSAL_TOKEN_MODES)}")
        if self.refusal_tokens != "none" and "pair" in RECIPES[self.recipe]:
            raise InputError("--refusal-tokens trains the cross-entropy recipes; DPO's pairs have no refusal token")

    def row_settings(self, kind: str) -> dict:
        """The settings a text row carries so that training tokenizes it as built (nothing dropped silently)."""
        out = {} if self.template == "auto" else {"template": self.template}
        if self.refusal_tokens != "none":
            out["refusal_tokens"] = self.refusal_tokens
        if kind in ("safe", "prefix", "rto", "pair"):
            out["refusal_phrase"] = self.refusal_phrase
        if kind == "rto":
            out.update(rto_keep_ratio=self.rto_keep_ratio, loss_weight=self.rto_weight)
        return out


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
    recovery = cfg.recipe == "recovery"
    # Exactly round(ratio * n) prefix rows get k = 0, chosen by the seed (recovery: Qi et al.'s half).
    n_prefix = len(safety) if "prefix" in kinds else 0
    no_ratio = 1.0 - RECOVERY_SHARE if recovery else cfg.no_prefix_ratio
    no_prefix = set(rng.sample(range(n_prefix), round(no_ratio * n_prefix))) if n_prefix else set()

    rows = [
        {**_extras(h, HELPFUL_FIELDS), "kind": "helpful", "instruction": h["instruction"], "prefix": "",
         "target": h["response"], **cfg.row_settings("helpful")}
        for h in helpful
    ]
    for i, t in enumerate(safety):
        extras = _extras(t, SAFETY_FIELDS)
        for kind in kinds:
            # Refusal targets are stored as given; tokenization writes them with the tokenizer's refusal
            # transition (models.refusal_transition), which text rows cannot know yet.
            row = {**extras, "kind": kind, "instruction": t["instruction"], "prefix": "",
                   "target": t["safe_response"].strip(), **cfg.row_settings(kind)}
            if kind == "prefix":
                units = _cut_points(cfg, t["harmful_response"], tokenizer)
                if recovery:
                    # Qi et al.: k uniform in 1..min(100, |r̂|), so the whole harmful response may come first.
                    k = 0 if (i in no_prefix or units < 1) else rng.randint(1, min(RECOVERY_MAX_PREFIX, units))
                else:
                    # A response too short to cut (< 2 units) keeps k = 0 rather than being dropped.
                    k = 0 if (i in no_prefix or units < 2) else rng.randint(1, units - 1)
                # No trailing whitespace: the separator belongs to the refusal, or the model would learn
                # "lone space -> refuse" instead of the transition itself.
                row["prefix"] = token_cut(tokenizer, t["harmful_response"], k) if cfg.cut == "token" else word_cut(t["harmful_response"], k)
            elif kind == "rto":
                row["target"] = t["harmful_response"]
            elif kind == "pair":
                row["rejected"] = t["harmful_response"]
            rows.append(row)
    return rows


def _extras(row: dict, known: tuple[str, ...]) -> dict:
    return {k: v for k, v in row.items() if k not in known and k not in ("kind", "prefix", "target", "input_ids", "labels")}


def recovery_mix(n_helpful: int, n_safety: int) -> str:
    """The helpful:safety mix of a recovery build, next to Qi et al.'s (16 benign + 4 recovery examples per step)."""
    ratio = f"{n_helpful / n_safety:.1f}:1" if n_safety else "no safety rows"
    return f"helpful:safety rows {ratio} (Qi et al. train 4:1: 16 benign and 4 safety recovery examples a step)"


# ---------------------------------------------------------------- tokenization


@functools.lru_cache(maxsize=32)
def _turn_parts(tokenizer, template: str, phrase: str):
    return end_of_turn_ids(tokenizer, template), refusal_transition(tokenizer, phrase)


def tokenize_row(row: dict, tokenizer, template: str = "auto", refusal_phrase: str = "Sorry",
                 rto_weight: float = 1.0) -> dict:
    """input_ids and labels (unshifted, -100 where no loss) for one text row; settings the row carries win.

    MLE rows (helpful, safe, prefix; pair: its chosen side): prompt + prefix + target + end of turn; loss on target and the
    end-of-turn token(s) the chat template writes (not necessarily eos). Refusal targets start with
    the refusal transition: its start form at the start of a response, its mid form after a prefix.
    rto rows: prompt + harmful response + end of turn; the labels at those |r̂|+1 positions are the
    transition token for that position (start form first, then mid form), so the logits from the
    end of the prompt through the last harmful token all point at a refusal. Every position is
    labelled here; `rto_keep_ratio` (carried in the row) is applied by the trainer, afresh each epoch.
    """
    from .models import resolve_template

    template = resolve_template(tokenizer, row.get("template", template))
    phrase = row.get("refusal_phrase", refusal_phrase)
    eot, transition = _turn_parts(tokenizer, template, phrase)
    prompt = encode_prompt(tokenizer, format_prompt(tokenizer, row["instruction"], template), template)
    prefix = encode_text(tokenizer, row.get("prefix", ""))
    text = row["target"]
    if row["kind"] in ("safe", "prefix", "pair"):
        text = refusal_text(text, transition.mid_text if row.get("prefix") else transition.start_text, phrase)
    marker = row_marker_id(row, tokenizer)  # [respond] / [refuse...] in front of the target, or None
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
    else:
        labels = context + target + eot
        weight = row.get("loss_weight", 1.0)
    out = {"input_ids": input_ids, "labels": labels, "loss_weight": weight}
    if row["kind"] == "pair":
        # DPO: input_ids/labels are the chosen (refusal) response; the rejected (harmful) one follows the same prompt.
        rejected = encode_text(tokenizer, row["rejected"])
        out.update(rejected_input_ids=prompt + rejected + eot, rejected_labels=context + rejected + eot)
    return out


def row_marker(row: dict) -> str | None:
    """The special token a row's target starts with (RTO: its label everywhere), or None without refusal tokens."""
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
        raise InputError(f"the tokenizer has no {token} token: add the rows' tokens first (data.refusal_token_list, "
                         "models.add_special_tokens); derta train and data build --tokenizer do this")
    return found


def refusal_token_list(rows: list[dict]) -> list[str]:
    """The special tokens rows built with --refusal-tokens need, in a fixed order (the same rows give the same ids):
    `[respond]`, `[refuse]` (single mode, or a refusal without a category), then `[refuse:CATEGORY]` by name."""
    modes = {r.get("refusal_tokens", "none") for r in rows} - {"none"}
    if not modes:
        return []
    if len(modes) > 1:
        raise InputError(f"rows mix --refusal-tokens modes ({', '.join(sorted(modes))}): build them with one")
    tokens = {row_marker(r) for r in rows if r.get("refusal_tokens", "none") != "none"}
    refuse = sorted(t for t in tokens if t not in (RESPOND_TOKEN, REFUSE_TOKEN))
    return [RESPOND_TOKEN] + ([REFUSE_TOKEN] if REFUSE_TOKEN in tokens else []) + refuse


def tokenize_rows(rows: list[dict], tokenizer, cfg: RecipeConfig) -> list[dict]:
    import sys

    from tqdm import tqdm

    # A progress bar for large sets on a terminal (tens of thousands of rows take minutes).
    quiet = len(rows) < 2000 or not sys.stderr.isatty()
    return [{**row, **tokenize_row(row, tokenizer, cfg.template, cfg.refusal_phrase, cfg.rto_weight)}
            for row in tqdm(rows, desc="tokenizing", unit="row", disable=quiet)]


def sample_rto_labels(labels: list[int], keep_ratio: float, rng: random.Random) -> list[int]:
    """An RTO row's labels with only `keep_ratio` of its labelled positions kept (at least one)."""
    positions = [j for j, x in enumerate(labels) if x != IGNORE]
    if keep_ratio >= 1.0 or not positions:
        return labels
    keep = set(rng.sample(positions, max(1, round(keep_ratio * len(positions)))))
    return [x if j in keep else IGNORE for j, x in enumerate(labels)]


# ---------------------------------------------------------------- labelled-token budget

# Above this share of all labelled tokens, RTO drowned the other objectives in a real run (SmolLM2:
# 63 % RTO tokens -> "SorrySorry..." loops); the paper's mix puts it at a few percent.
RTO_SHARE_WARN = 0.25


def label_token_counts(rows: list[dict]) -> dict[str, float]:
    """Labelled tokens per objective (kind), RTO rows counted at their expected kept share."""
    counts = {k: 0.0 for k in KINDS if k != "pair"}  # DPO's pair rows are listed only where there are some
    for r in rows:
        n = sum(x != IGNORE for x in r["labels"])
        counts[r["kind"]] = counts.get(r["kind"], 0.0) + n * (r.get("rto_keep_ratio", 1.0) if r["kind"] == "rto" else 1.0)
    return counts


def label_token_shares(rows: list[dict]) -> dict[str, float]:
    counts = label_token_counts(rows)
    total = sum(counts.values()) or 1.0
    return {k: round(v / total, 4) for k, v in counts.items() if v}


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
        line += (f" -- warning: RTO is {100 * shares['rto']:.0f}% of labelled tokens (> {100 * RTO_SHARE_WARN:.0f}%); "
                 "lower --rto-keep-ratio or set --max-rto-share (the model may loop on the refusal token)")
    return line


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
