"""`derta tiny`: a tiny randomly initialised Llama-architecture model and its tokenizer, made offline.

Used by the tests and the demo in place of a hub checkpoint: it loads with
`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(DIR)` like any real model.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from derta.data.synthetic_corpus import tokenizer_corpus as synthetic_corpus
from derta.io import InputError
from derta.models.refusal_tokens import REFUSAL_PHRASE

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"

# Minimal chat template: the assistant turn ends with EOS, which is what training teaches.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
    "{% elif m['role'] == 'assistant' %}<|assistant|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Generic text so the tokenizer knows ordinary English even without the demo corpus.
_GENERIC = (
    "Sorry, I cannot help with that. Sorry, I can't assist with this request. I'm sorry, but I won't do that. "
    "I am sorry. As an AI, I cannot provide that. Sure, here is the answer. Here is how to do it. Step 1: "
    "Step 2: Step 3: Step 4: Step 5: The answer is 0 1 2 3 4 5 6 7 8 9. First, second, third, then, finally. "
    "Please tell me how to write a short story about the river, the city, the house and the people. "
    "What is the first word? What is the last word? Repeat these words. Explain the steps. "
)


def tokenizer_corpus() -> list[str]:
    """Default training text: generic English plus every word the synthetic demo data uses."""

    return [_GENERIC] * 20 + synthetic_corpus()


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 2048, refusal_phrase: str = REFUSAL_PHRASE):
    """Byte-level BPE (lossless on any text) with a chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, USER, ASSISTANT, SYSTEM],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # The refusal phrase is repeated so that both `Sorry` and ` Sorry` become single tokens.
    phrase = refusal_phrase.strip()
    bpe.train_from_iterator(list(corpus) + [f"{phrase}, {phrase}. {phrase} {phrase}"] * 200, trainer=trainer)
    # Like Llama: plain encoding (add_special_tokens=True) starts with BOS.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=[USER, ASSISTANT, SYSTEM],
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.padding_side = "right"
    for form in (phrase, " " + phrase):
        if len(tok(form, add_special_tokens=False)["input_ids"]) != 1:
            raise InputError(
                f"--vocab-size {vocab_size} is too small: the tokenizer did not learn {form!r} as one token"
            )
    return tok


def random_model(
    vocab_size: int = 32000,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 1024,
    seed: int = 0,
    special_ids: tuple[int, int, int] = (1, 2, 0),
):
    """build_tiny's architecture, randomly initialised from `seed`, with any vocabulary size; `special_ids` are the
    (bos, eos, pad) ids. `derta bench` uses it without a tokenizer (token ids only): a byte-level BPE cannot learn
    32k merges from the small offline corpus, so its real-vocabulary-sized model is made from a config alone.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    bos, eos, pad = special_ids
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# What a tiny model can be: the byte-level tokenizer needs 256 byte tokens, 6 special ones and the merges that make
# "Sorry" and " Sorry" single tokens (512 leaves room for them on the built-in corpus); RoPE needs an even head
# size; above the maxima it is no longer tiny (and would take the machine's memory).
TINY_LIMITS = {"vocab_size": (512, 1 << 18), "hidden_size": (8, 8192), "layers": (1, 128), "heads": (1, 128)}


def check_tiny_settings(vocab_size: int, hidden_size: int, layers: int, heads: int) -> None:
    values = {"vocab_size": vocab_size, "hidden_size": hidden_size, "layers": layers, "heads": heads}
    for name, (low, high) in TINY_LIMITS.items():
        if not low <= values[name] <= high:
            raise InputError(
                f"--{name.replace('_', '-')} must be between {low} and {high} for a tiny model, not {values[name]}"
            )
    if hidden_size % (2 * heads):
        raise InputError(
            f"--hidden-size must be a multiple of {2 * heads} ({heads} attention heads of an even size), not {hidden_size}"
        )


def build_tiny(
    out: str | Path,
    seed: int = 0,
    vocab_size: int = 2048,
    hidden_size: int = 128,
    layers: int = 4,
    heads: int = 4,
    max_positions: int = 512,
    corpus: Iterable[str] | None = None,
) -> Path:
    """Write a tiny LlamaForCausalLM and its tokenizer to `out`; returns the directory."""
    out = Path(out)
    check_tiny_settings(vocab_size, hidden_size, layers, heads)
    if out.exists() and any(out.iterdir()):
        raise InputError("output directory exists and is not empty", out)
    tok = train_tokenizer(corpus if corpus is not None else tokenizer_corpus(), vocab_size=vocab_size)
    model = random_model(
        len(tok),
        hidden_size,
        layers,
        heads,
        max_positions,
        seed,
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id),
    )
    model.generation_config.pad_token_id = tok.pad_token_id
    # Write to a temp dir and rename, so an interrupted run leaves no half-made model.
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
