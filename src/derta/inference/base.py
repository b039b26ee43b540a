"""What every backend takes and gives: `GenInput`s in, response texts out, in input order.

    backend.generate(inputs) -> responses, in input order
    backend.generate_iter(inputs) -> (input indices, responses) one batch at a time, so callers
                                     can save results as they finish

Every backend's responses pass through `Backend.generate_iter`, the one place where a backtracking model's
`[RESET]` is acted on: only the text after the last one is returned, and `backend.resets` records whose.

Nothing here imports torch at module level: `derta eval` resuming a finished run never loads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from derta.models.refusal_tokens import RESET_TOKEN
from derta.models.templates import encode_prompt, encode_text, format_prompt


@dataclass(frozen=True)
class GenInput:
    """One generation request: a chat instruction (with optional assistant prefill) or raw text."""

    text: str
    prefill: str = ""  # the start of the assistant turn, e.g. "Sure, here is"; the response continues it
    chat: bool = True  # False: `text` is continued as is, with no chat template
    meta: dict = field(default_factory=dict, compare=False)  # what the attack wants recorded, e.g. a template name


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding instead of greedy (`HFBackend`): batch k draws from seed `seed` + k, so a run is repeatable."""

    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0


def encode_input(tokenizer, inp: GenInput, template: str = "auto", system: str | None = None) -> list[int]:
    """Token ids of an input, segment by segment: prompt ids, then prefill ids (never re-tokenized as one string)."""
    if inp.chat:
        ids = encode_prompt(tokenizer, format_prompt(tokenizer, inp.text, template, system), template)
    else:
        ids = encode_prompt(tokenizer, inp.text, "raw")  # raw text gets the tokenizer's own BOS, if any
    return ids + encode_text(tokenizer, inp.prefill)


def after_reset(text: str) -> tuple[str, bool]:
    """The text after the last `[RESET]` (what a backtracking model answers), and whether it reset at all: what came
    before a reset is dropped, as Zhang et al. do at inference."""
    _, sep, tail = text.rpartition(RESET_TOKEN)
    return (tail.lstrip(), True) if sep else (text, False)


class Backend:
    """Common interface; subclasses implement `batches` (raw texts), `generate_iter` post-processes them."""

    name = "backend"
    resets: set[int] = frozenset()  # positions of the last generate_iter's inputs whose response had a [RESET]

    def batches(self, inputs: list[GenInput], **kwargs) -> Iterator[tuple[list[int], list[str]]]:
        raise NotImplementedError

    def generate_iter(self, inputs: list[GenInput], **kwargs) -> Iterator[tuple[list[int], list[str]]]:
        self.resets = set()
        for idx, texts in self.batches(inputs, **kwargs):
            kept = []
            for i, text in zip(idx, texts):
                text, reset = after_reset(text)
                if reset:
                    self.resets.add(i)
                kept.append(text)
            yield idx, kept

    def generate(self, inputs: list[GenInput]) -> list[str]:
        return collect(self.generate_iter(inputs), len(inputs))


def collect(batches: Iterator[tuple[list[int], list[str]]], n: int) -> list[str]:
    """The texts of a `generate_iter`-style stream of (indices, texts), back in input order."""
    out = [""] * n
    for idx, texts in batches:
        for i, t in zip(idx, texts):
            out[i] = t
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple:
    """input_ids, attention_mask and position_ids for left-padded sequences (positions start at 0 per row)."""
    import torch  # here, not at the top: commands that only read finished runs never load torch

    width = max(len(s) for s in seqs)
    # Padding is masked out; a tokenizer with neither a pad nor an eos token still needs some id there.
    ids = torch.full((len(seqs), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def padded_forward(model, seqs: list[list[int]], pad_id: int, **kwargs):
    """The model's output on left-padded sequences (no gradient), on the model's device: every response or target
    ends at the last column, so `logits_to_keep` and the last hidden states cover them."""
    import torch

    device = next(model.parameters()).device
    ids, mask, positions = left_pad(seqs, pad_id)
    with torch.no_grad():
        return model(
            input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device), **kwargs
        )


def context_length(model) -> int | None:
    """The number of positions the model was trained for (None when its config does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def over_context(model, lengths: list[int], what: str, main: bool = True) -> set[int]:
    """Positions in `lengths` (token counts, new tokens included) beyond the model's context, with one warning line
    on stderr (from the main process) counting them: their outputs come from positions the model never saw."""
    import sys

    limit = context_length(model)
    long = {i for i, n in enumerate(lengths) if limit is not None and n > limit}
    if long and main:
        print(
            f"derta: warning: {len(long)} of {len(lengths)} {what} are longer than the model's context "
            f"({limit} tokens); their results are unreliable",
            file=sys.stderr,
        )
    return long
