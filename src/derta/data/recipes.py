"""Training data recipes: vanilla safety tuning, harmful-prefix MLE, RTO, DeRTa (both), and the baselines.

A safety triple is (instruction q, harmful response r̂, safe response r). Recipes turn each
triple into training rows; helpful (instruction, response) rows pass through unchanged:

    vanilla -> safe              (q -> r)
    prefix  -> prefix            (q + r̂<k -> r), k = 0 for about `no_prefix_ratio` of rows
    rto     -> safe + rto        (q + r̂, refusal token trained after every position)
    derta   -> prefix + rto
    recovery-> prefix            Qi et al.'s safety recovery rows: half get k ~ U{1..min(100, |r̂|)}, half k = 0
    dpo     -> pair              a preference pair (chosen r, rejected r̂), trained with TRL's DPOTrainer
    circuit-breakers -> safe + reroute   Zou et al.: hidden states of q + r̂ rerouted, the others retained (train.circuit)
    vanilla-circuit-breakers             the same rows, trained from the vanilla model (one that already refuses)
    backtrack -> safe + backtrack        Zhang et al.: q + r̂<k + [RESET] + r, loss on [RESET] and r (k >= 1)
    backtrack-dpo -> pair                Zhang et al.'s DPO stage: after q + r̂<k, [RESET] + r preferred over the rest of r̂

A row is text (`kind`, `instruction`, `prefix`, `target`); `data.tokenize` turns it into
`input_ids`/`labels` segment by segment, so the loss boundary is exactly where the text says.

With refusal tokens (`refusal_tokens`: single or category, after Jain et al., 2024; the `derta-tokens`
recipe) every helpful target starts with `[respond]` and every refusal with `[refuse]` / `[refuse:CATEGORY]`,
and RTO trains that same token at every position of the harmful response: one decision token, at the start
and mid-response, whose probability `derta calibrate` thresholds per category.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from derta.io import NUMERIC_RULES, InputError, check_number
from derta.models.refusal_tokens import REFUSAL_PHRASE, REFUSAL_TOKEN_MODES
from derta.models.templates import encode_text


@dataclass(frozen=True)
class Recipe:
    """What a recipe makes of each safety triple (the row kinds, in order), and how reports name it."""

    kinds: tuple[str, ...]
    title: str
    refusal_tokens: str = "none"  # a recipe that always trains refusal tokens (RecipeConfig.refusal_tokens)
    after: str | None = None  # a second stage: it trains the model this recipe made, not the untuned one
    subset: str | None = None  # the demo trains it on SUBSET_SHARE of the triples: "cliff" (largest first) or "random"


RECIPES = {
    "vanilla": Recipe(("safe",), "Vanilla"),
    "prefix": Recipe(("prefix",), "+ harmful prefix"),
    "rto": Recipe(("safe", "rto"), "+ RTO"),
    "derta": Recipe(("prefix", "rto"), "DeRTa (prefix + RTO)"),
    # DeRTa whose refusals start with a per-category refusal token, thresholded by `derta calibrate`.
    "derta-tokens": Recipe(("prefix", "rto"), "DeRTa + refusal tokens (calibrated)", refusal_tokens="category"),
    # Cliff-as-a-Judge in the demo (recipes.demo.subsets): DeRTa on the tenth of the triples with the largest refusal
    # cliff under the untuned model, and on a random tenth.
    "derta-cliff": Recipe(("prefix", "rto"), "DeRTa, 10 % of triples by cliff", subset="cliff"),
    "derta-random": Recipe(("prefix", "rto"), "DeRTa, a random 10 % of triples", subset="random"),
    # Baselines (docs/baselines.md): Qi et al.'s safety recovery examples, and DPO on the same triples.
    "recovery": Recipe(("prefix",), "Recovery (Qi et al.)"),
    "dpo": Recipe(("pair",), "DPO"),
    # The representation-level and reset defences (docs/baselines.md): Circuit Breakers and Backtracking.
    "circuit-breakers": Recipe(("safe", "reroute"), "Circuit Breakers (Zou et al.)"),
    # Zou et al. reroute a model that refuses plain requests already (Llama-3-8B-Instruct); a small chat model that
    # answers them gets that starting point from the vanilla recipe.
    "vanilla-circuit-breakers": Recipe(("safe", "reroute"), "Vanilla + Circuit Breakers", after="vanilla"),
    "backtrack": Recipe(("safe", "backtrack"), "Backtracking (Zhang et al.)"),
    # Its DPO stage, trained from the backtrack SFT model: pairs that share a harmful prefix, resetting preferred.
    "backtrack-dpo": Recipe(("pair",), "Backtracking + DPO (Zhang et al.)", after="backtrack"),
}
KINDS = ("helpful", "safe", "prefix", "rto", "pair", "reroute", "backtrack")
# The kinds trained by cross-entropy on their labels through DertaTrainer (counted in the labelled-token shares).
CE_KINDS = ("helpful", "safe", "prefix", "rto", "backtrack")
SUBSET_SHARE = 0.1  # of the safety triples, for the demo's subset recipes (Cliff-as-a-Judge kept 1.7 % of its data)
# Qi et al. (shallow-vs-deep-alignment): prefixes of at most 100 harmful tokens, on half of the safety rows.
RECOVERY_MAX_PREFIX = 100
RECOVERY_SHARE = 0.5
SAFETY_FIELDS = ("instruction", "harmful_response", "safe_response")
HELPFUL_FIELDS = ("instruction", "response")


@dataclass
class RecipeConfig:
    recipe: str = "derta"
    seed: int = 42
    no_prefix_ratio: float = 0.33
    cut: str = "word"  # "word" (word boundaries) or "token" (needs a tokenizer)
    refusal_phrase: str = REFUSAL_PHRASE
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
        for name in ("no_prefix_ratio", "rto_keep_ratio", "rto_weight", "max_rto_share"):
            check_number(getattr(self, name), "--" + name.replace("_", "-"), NUMERIC_RULES[name])
        if not self.refusal_phrase.split():
            raise InputError("--refusal-phrase must not be empty")
        if self.refusal_tokens not in REFUSAL_TOKEN_MODES:
            raise InputError(
                f"unknown --refusal-tokens '{self.refusal_tokens}': use one of {', '.join(REFUSAL_TOKEN_MODES)}"
            )
        if self.refusal_tokens == "none":
            self.refusal_tokens = RECIPES[self.recipe].refusal_tokens
        if self.refusal_tokens != "none" and {"pair", "reroute", "backtrack"} & set(self.kinds):
            raise InputError(
                f"--refusal-tokens trains the cross-entropy refusal recipes, not {self.recipe} (DPO's pairs, "
                "rerouted states and [RESET] have no refusal token)"
            )

    @property
    def kinds(self) -> tuple[str, ...]:
        return RECIPES[self.recipe].kinds

    def row_settings(self, kind: str) -> dict:
        """The settings a text row carries so that training tokenizes it as built (nothing dropped silently)."""
        out = {} if self.template == "auto" else {"template": self.template}
        if self.refusal_tokens != "none":
            out["refusal_tokens"] = self.refusal_tokens
        if kind in ("safe", "prefix", "rto", "pair", "backtrack"):
            out["refusal_phrase"] = self.refusal_phrase
        if kind == "rto":
            out.update(rto_keep_ratio=self.rto_keep_ratio, loss_weight=self.rto_weight)
        return out


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
    kinds = cfg.kinds
    recovery = cfg.recipe == "recovery"
    reset = cfg.recipe == "backtrack-dpo"  # its pairs start after a harmful prefix, the chosen side with [RESET]
    # Exactly round(ratio * n) prefix rows get k = 0, chosen by the seed (recovery: Qi et al.'s half).
    n_prefix = len(safety) if "prefix" in kinds else 0  # backtrack rows always have a prefix (k >= 1)
    no_ratio = 1.0 - RECOVERY_SHARE if recovery else cfg.no_prefix_ratio
    no_prefix = set(rng.sample(range(n_prefix), round(no_ratio * n_prefix))) if n_prefix else set()

    rows = [
        {
            **_extras(h, HELPFUL_FIELDS),
            "kind": "helpful",
            "instruction": h["instruction"],
            "prefix": "",
            "target": h["response"],
            **cfg.row_settings("helpful"),
        }
        for h in helpful
    ]
    for i, t in enumerate(safety):
        extras = _extras(t, SAFETY_FIELDS)
        for kind in kinds:
            # Refusal targets are stored as given; tokenization writes them with the tokenizer's refusal
            # transition (models.refusal_transition), which text rows cannot know yet.
            row = {
                **extras,
                "kind": kind,
                "instruction": t["instruction"],
                "prefix": "",
                "target": t["safe_response"].strip(),
                **cfg.row_settings(kind),
            }
            if kind in ("prefix", "backtrack") or reset:
                units = _cut_points(cfg, t["harmful_response"], tokenizer)
                k = _prefix_units("backtrack" if reset else kind, recovery, i in no_prefix, units, rng)
                # No trailing whitespace: the separator belongs to the refusal, or the model would learn
                # "lone space -> refuse" instead of the transition itself.
                row["prefix"] = (
                    token_cut(tokenizer, t["harmful_response"], k)
                    if cfg.cut == "token"
                    else word_cut(t["harmful_response"], k)
                )
            elif kind in ("rto", "reroute"):
                row["target"] = t["harmful_response"]
            if kind == "pair":
                # With a prefix (backtrack-dpo): the rejected side continues the harmful response where it stops.
                row["rejected"] = t["harmful_response"][len(row["prefix"]) :] if reset else t["harmful_response"]
                if reset:
                    row["reset"] = True
            rows.append(row)
    return rows


def _prefix_units(kind: str, recovery: bool, no_prefix: bool, units: int, rng: random.Random) -> int:
    """How many units (words or tokens) of the harmful response a prefix or backtrack row starts with."""
    if kind == "backtrack":
        # A reset needs something to undo: k as the prefix recipe draws its k > 0 (one unit if only one).
        return min(units, 1) if units < 2 else rng.randint(1, units - 1)
    if recovery:
        # Qi et al.: k uniform in 1..min(100, |r̂|), so the whole harmful response may come first.
        return 0 if (no_prefix or units < 1) else rng.randint(1, min(RECOVERY_MAX_PREFIX, units))
    # A response too short to cut (< 2 units) keeps k = 0 rather than being dropped.
    return 0 if (no_prefix or units < 2) else rng.randint(1, units - 1)


def _extras(row: dict, known: tuple[str, ...]) -> dict:
    return {
        k: v for k, v in row.items() if k not in known and k not in ("kind", "prefix", "target", "input_ids", "labels")
    }


def recovery_mix(n_helpful: int, n_safety: int) -> str:
    """The helpful:safety mix of a recovery build, next to Qi et al.'s (16 benign + 4 recovery examples per step)."""
    ratio = f"{n_helpful / n_safety:.1f}:1" if n_safety else "no safety rows"
    return f"helpful:safety rows {ratio} (Qi et al. train 4:1: 16 benign and 4 safety recovery examples a step)"
