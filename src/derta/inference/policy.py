"""Refusal tokens at inference: thresholds (and biases) applied to a model's refusal tokens at every generated
position, one implementation behind the transformers LogitsProcessor and the vLLM adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from derta.files import fingerprint
from derta.io import InputError, check_number, loads, read_text
from derta.models.refusal_tokens import (
    REFUSAL_PHRASE,
    RESET_TOKEN,
    marker_tokens,
    policy_tokens,
    refusal_transition,
    reset_token_id,
)


@dataclass
class RefusalPolicy:
    """How generation treats a model's refusal tokens (`data build --refusal-tokens`), at every generated position.

    `thresholds` {token: tau}: a refusal token is emitted exactly when its probability reaches its tau (the most
    decisive one, by p / tau, when several do), and is blocked otherwise, so tau alone sets how often the model
    refuses, per category. `biases` {token: b}: added to the token's logit first (a softer dial). Right after a
    refusal token the next token is held to the refusal transition of `refusal_phrase` ("Sorry" / " sorry", what
    every trained refusal continues with), so the visible text refuses whenever the token fires, even where the
    model never saw a refusal (a benign prompt). After that, refusal tokens are blocked: one decision per response.
    From `derta calibrate`'s calibration.json (`from_file`).
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    biases: dict[str, float] = field(default_factory=dict)
    refusal_phrase: str = REFUSAL_PHRASE

    @classmethod
    def from_file(cls, path, model=None) -> RefusalPolicy:
        """The policy in a calibration.json; with `model` (a local path), refused when the file was calibrated on
        another model (its "inputs" fingerprint, `files.fingerprint`)."""
        data = loads(read_text(path, "calibration file"), path)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("thresholds", {}), dict)
            or not isinstance(data.get("biases", {}), dict)
            or not (data.get("thresholds") or data.get("biases"))
        ):
            raise InputError("a calibration file has 'thresholds' (and/or 'biases'): {token: number}", path)
        # A threshold is a probability the token must reach (above 1: never); a bias is added to a logit.
        for key, rule in (("thresholds", "nonneg"), ("biases", None)):
            for token, value in data.get(key, {}).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise InputError(f"{key}: {token} must be a finite number, not {value!r}", path)
                if rule:
                    check_number(value, f"{key}: {token}", rule, path)
        phrase = data.get("refusal_phrase", REFUSAL_PHRASE)
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputError("refusal_phrase must be a non-empty string", path)
        made_for = (data.get("inputs") or {}).get("--model") if isinstance(data.get("inputs"), dict) else None
        if made_for and (now := fingerprint(model)) is not None and now != made_for:
            raise InputError(
                f"calibrated on another model than {model} (its files differ): run derta calibrate on this model", path
            )
        return cls(
            {k: float(v) for k, v in data.get("thresholds", {}).items()},
            {k: float(v) for k, v in data.get("biases", {}).items()},
            phrase,
        )

    def tensors(self, tokenizer):
        """(ids, thresholds, biases) over the tokenizer's refusal tokens; a token the policy names must exist."""
        import torch

        have = policy_tokens(tokenizer)
        if not have:
            raise InputError(
                "the model has no refusal tokens and no [RESET] (train it on data build --refusal-tokens or "
                "--recipe backtrack rows)"
            )
        unknown = sorted((set(self.thresholds) | set(self.biases)) - set(have))
        if unknown:
            raise InputError(f"the calibration names tokens this model does not have: {', '.join(unknown)}")
        names = list(have)
        # A token without a threshold (a category calibration never saw) never fires on its own: tau above 1.
        tau = torch.tensor([self.thresholds.get(t, 2.0) for t in names]) if self.thresholds else None
        bias = torch.tensor([self.biases.get(t, 0.0) for t in names]) if self.biases else None
        return torch.tensor([have[t] for t in names]), tau, bias

    def follow_ids(self, tokenizer):
        """The tokens a refusal token must be followed by: the transition's start and mid forms."""
        import torch

        return torch.tensor(refusal_transition(tokenizer, self.refusal_phrase).ids)

    def for_tokenizer(self, tokenizer) -> tuple:
        """(ids, thresholds, biases, follow ids): what `apply_refusal_policy` takes, worked out once per model."""
        return (*self.tensors(tokenizer), self.follow_ids(tokenizer))


def apply_refusal_policy(scores, ids, thresholds=None, biases=None, done=None, follow=None, just=None):
    """Next-token scores (B, V) with a RefusalPolicy applied.

    `done` (B,): rows that already emitted a refusal token (refusal tokens blocked); `just` (B,): rows whose last
    token is one, whose next token is held to `follow` (the transition ids; the model picks among them).
    The one implementation behind the transformers LogitsProcessor and the vLLM adapter.
    """
    import torch

    ids = ids.to(scores.device)
    original = scores
    scores = scores.clone()
    if biases is not None:
        scores[:, ids] += biases.to(scores.device, scores.dtype)
    blocked = (
        torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device) if done is None else done.to(scores.device)
    )
    if thresholds is not None:
        p = torch.softmax(scores.float(), dim=-1)[:, ids]
        tau = thresholds.to(scores.device, torch.float32)
        fire = (p >= tau) & ~blocked[:, None]
        rows = fire.any(-1)
        if rows.any():
            pick = ids[torch.where(fire, p / tau.clamp(min=1e-30), torch.tensor(-1.0, device=p.device)).argmax(-1)]
            forced = torch.full_like(scores, float("-inf"))
            forced[torch.arange(scores.shape[0], device=scores.device), pick] = 0.0
            scores = torch.where(rows[:, None], forced, scores)
        blocked = blocked | ~rows
    scores[blocked[:, None] & torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids)[None, :]] = float(
        "-inf"
    )
    if follow is not None and just is not None and just.any():
        follow = follow.to(scores.device)
        held = torch.full_like(scores, float("-inf"))
        held[:, follow] = original[:, follow]
        scores = torch.where(just.to(scores.device)[:, None], held, scores)
    return scores


def refusal_logits_processor(parts: tuple, prompt_width: int):
    """A transformers LogitsProcessor applying a policy (`RefusalPolicy.for_tokenizer`'s parts); generated tokens
    start at column `prompt_width`."""
    from transformers import LogitsProcessor

    ids, tau, bias, follow = parts

    class RefusalTokenProcessor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            import torch

            generated = input_ids[:, prompt_width:]
            marked = torch.isin(generated, ids.to(input_ids.device))
            just = marked[:, -1] if generated.shape[1] else None
            return apply_refusal_policy(scores, ids, tau, bias, marked.any(-1), follow, just)

    return RefusalTokenProcessor()


def visible_text(tokenizer, ids: list[int], show_refusal_tokens: bool = False) -> str:
    """Decoded response text; refusal tokens and [respond] (special tokens) are hidden unless `show_refusal_tokens`.
    `[RESET]` is always written out: `Backend.generate_iter` keeps only what follows it."""

    marks = {i: t for t, i in marker_tokens(tokenizer).items()} if show_refusal_tokens else {}
    if (reset := reset_token_id(tokenizer)) is not None:
        marks[reset] = RESET_TOKEN
    if not marks:
        return tokenizer.decode(ids, skip_special_tokens=True)
    parts, start = [], 0
    for k, i in enumerate(ids):
        if i in marks:
            parts += [tokenizer.decode(ids[start:k], skip_special_tokens=True), marks[i]]
            start = k + 1
    return "".join(parts + [tokenizer.decode(ids[start:], skip_special_tokens=True)])
