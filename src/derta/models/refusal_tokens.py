"""What a refusal starts with, in a model's tokens: the refusal transition and the refusal tokens.

DeRTa trains one transition: RTO labels every position of a harmful response with the token a
refusal starts with there ("Sorry" at the start of a response, " sorry" or " Sorry" after a harmful
prefix, whichever the tokenizer has whole), and the probe and generation count the same tokens.
With `data build --refusal-tokens`, special tokens (`[refuse]`, `[refuse:CATEGORY]`, `[respond]`)
take that role instead (after Jain et al., 2024, here mid-response too).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from derta.io import InputError
from derta.models.templates import encode_text

# The refusal's first word: every refusal derta trains starts with it, and its token is what RTO trains.
REFUSAL_PHRASE = "Sorry"


@dataclass(frozen=True)
class RefusalTransition:
    """How a refusal starts, at the start of a response and inside one, for one tokenizer.

    DeRTa teaches one transition: the token RTO trains at a position is the token a prefix row's
    refusal starts with at that position, and the probe and generation count the same tokens.
    `start_text` begins a response ("Sorry"); `mid_text` follows a harmful prefix, separator
    included (" Sorry", or " sorry" where the tokenizer splits " Sorry" into fragments).
    """

    phrase: str
    start_text: str
    mid_text: str
    start_id: int
    mid_id: int

    @property
    def ids(self) -> list[int]:
        return sorted({self.start_id, self.mid_id})


def _whole_word_first_token(tokenizer, form: str, word: str) -> int | None:
    """The first token of `form` if it is the whole `word` (with any leading space), else None."""
    ids = encode_text(tokenizer, form)
    return ids[0] if ids and tokenizer.decode([ids[0]]).strip() == word else None


def refusal_transition(tokenizer, phrase: str = REFUSAL_PHRASE) -> RefusalTransition:
    """Choose the refusal's first token at the start of a response and after a harmful prefix.

    Candidates, first whole-word single token wins:
      start: "Sorry", then "sorry";
      mid:   " Sorry", then " sorry", then the start form glued on (no separator).
    Byte-level BPEs with a large vocabulary (Llama-3, Qwen) and SentencePiece (Mistral, Llama-2)
    have " Sorry" whole; SmolLM2 (49k vocab) splits it into "ĠSor" + "ry" but has " sorry" whole.
    A word fragment is never used: its probability would count every word that starts alike.
    """
    match = re.match(r"\w+|\S+", phrase.strip())
    if not match:
        raise InputError("--refusal-phrase must not be empty")
    word = match.group()
    variants = list(dict.fromkeys([word, word[0].lower() + word[1:], word[0].upper() + word[1:]]))
    start = next(((v, i) for v in variants if (i := _whole_word_first_token(tokenizer, v, v)) is not None), None)
    if start is None:
        first = encode_text(tokenizer, word)
        raise InputError(
            f"refusal phrase {phrase!r}: this tokenizer has no single token for {word!r} "
            f"(it starts with {tokenizer.decode(first[:1])!r}); choose another --refusal-phrase"
        )
    mid = next(
        ((" " + v, i) for v in variants if (i := _whole_word_first_token(tokenizer, " " + v, v)) is not None), None
    )
    if mid is None:
        warnings.warn(
            f"no whole-word token for {' ' + word!r}: refusals after a harmful prefix are glued on "
            f"({start[0]!r} with no separator)",
            stacklevel=2,
        )
        mid = start
    return RefusalTransition(phrase, start[0], mid[0], start[1], mid[1])


def refusal_text(response: str, form: str, phrase: str = REFUSAL_PHRASE) -> str:
    """A refusal written so that it starts with the transition `form` (start or mid form).

    A response that starts with the phrase's word gets that word in the chosen form ("Sorry, I
    can't" -> " sorry, I can't"); any other refusal gets the word put in front ("I can't" ->
    "Sorry, I can't"), so every refusal the model learns starts with the trained token.
    """
    text = response.strip()
    word = re.match(r"\w+|\S+", phrase.strip()).group()
    if re.match(re.escape(word) + r"\b", text, flags=re.IGNORECASE):
        return form + text[len(word) :]
    return f"{form}, {text}"


def refusal_token_ids(tokenizer, phrase: str = REFUSAL_PHRASE) -> list[int]:
    """The tokens counted as "starts refusing": the model's refusal tokens if it has them (`data build
    --refusal-tokens`), else the transition's start and mid tokens; and `[RESET]` for a backtracking model, whose
    refusal inside a response starts with it."""
    ids = sorted(refusal_tokens(tokenizer).values()) or refusal_transition(tokenizer, phrase).ids
    reset = reset_token_id(tokenizer)
    return ids + ([reset] if reset is not None else [])


# `data build --refusal-tokens`: helpful targets start with RESPOND_TOKEN, refusals with a refusal token, which RTO
# also trains at every position of a harmful response. Added to the tokenizer as special tokens, so decoding with
# skip_special_tokens hides them from the user-visible text.
REFUSAL_TOKEN_MODES = ("none", "single", "category")
RESPOND_TOKEN, REFUSE_TOKEN = "[respond]", "[refuse]"
# Backtracking (`data build --recipe backtrack`, after Zhang et al., 2025): the model emits RESET_TOKEN after a partial
# unsafe response and starts over; generation keeps only the text after the last one (`inference.base.after_reset`).
RESET_TOKEN = "[RESET]"


def category_name(category) -> str | None:
    """A `category` field as it appears in a token name: lower case, runs of other characters as '_' (None: no category)."""
    if category is None:
        return None
    name = re.sub(r"[^a-z0-9]+", "_", str(category).strip().lower()).strip("_")
    return name or None


def refuse_token(category: str | None = None) -> str:
    """`[refuse]`, or `[refuse:CATEGORY]` for a category."""
    name = category_name(category)
    return f"[refuse:{name}]" if name else REFUSE_TOKEN


def token_category(token: str) -> str | None:
    """The category of a refusal token (None for the plain `[refuse]`)."""
    return token[len("[refuse:") : -1] if token.startswith("[refuse:") else None


def refusal_tokens(tokenizer) -> dict[str, int]:
    """{token: id} of the refusal tokens `data build --refusal-tokens` added to this tokenizer (empty: none)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {
        t: i
        for t, i in sorted(added.items(), key=lambda x: x[1])
        if t == REFUSE_TOKEN or (t.startswith("[refuse:") and t.endswith("]"))
    }


def reset_token_id(tokenizer) -> int | None:
    """The id of `[RESET]` in a tokenizer that has it (a model trained with --recipe backtrack), else None."""
    return tokenizer.get_added_vocab().get(RESET_TOKEN) if hasattr(tokenizer, "get_added_vocab") else None


def policy_tokens(tokenizer) -> dict[str, int]:
    """{token: id} of what a refusal policy thresholds and `derta calibrate` sets thresholds for: the refusal tokens,
    or `[RESET]` for a backtracking model (a refusal inside its response starts with it); empty: neither."""
    reset = reset_token_id(tokenizer)
    return refusal_tokens(tokenizer) or ({RESET_TOKEN: reset} if reset is not None else {})


def marker_tokens(tokenizer) -> dict[str, int]:
    """{token: id} of every derta marker this tokenizer has: the refusal tokens and `[respond]`."""
    respond = tokenizer.get_added_vocab().get(RESPOND_TOKEN) if hasattr(tokenizer, "get_added_vocab") else None
    return {**refusal_tokens(tokenizer), **({RESPOND_TOKEN: respond} if respond is not None else {})}


def add_special_tokens(tokenizer, tokens: list[str]) -> list[str]:
    """Add the tokens the tokenizer lacks, in the given order, as special tokens; returns those added."""
    missing = [t for t in tokens if t not in tokenizer.get_added_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def init_new_embeddings(model, tokenizer, added: list[str], refusal_phrase: str = REFUSAL_PHRASE) -> None:
    """Make room for `added` tokens and give each refusal token, and `[RESET]`, the embedding (input and output) of
    the refusal phrase's first token, so it starts out as likely as "Sorry" where a refusal begins; `[respond]`
    keeps the mean embedding transformers gives new rows.

    `[RESET]` starts a refusal inside a response. From the mean row its logit is far below the text's, and a small
    LoRA budget does not lift it (SmolLM2-135M, 1,300 rows: still ranked 326th-1472nd where it was trained)."""
    import torch

    if not added:
        return
    source = refusal_transition(tokenizer, refusal_phrase).start_id
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    with torch.no_grad():
        for emb in {
            id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None
        }.values():
            for token in added:
                if token != RESPOND_TOKEN:
                    emb.weight[tokenizer.convert_tokens_to_ids(token)] = emb.weight[source]
