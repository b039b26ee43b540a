"""Loading models and tokenizers, formatting prompts, and finding the refusal token.

One place decides how a question becomes a prompt (chat template, the paper's `[INST]`
format, a custom format string, or raw text) so that training, probing and evaluation
all see the same thing.
"""

from __future__ import annotations

import os
import warnings

from .io import InputError

# The paper's format for base models without a chat template (as in its released data).
INST_TEMPLATE = "[INST] {instruction} [\\INST]"
TEMPLATES = ("auto", "chat", "inst", "raw")
DTYPES = ("auto", "float32", "bfloat16", "float16")  # what load_model accepts
# Off unless the user asks (`derta --trust-remote-code ...` sets it).
TRUST_REMOTE_CODE = False


def _hub_kwargs(trust_remote_code: bool | None) -> dict:
    kw = {"trust_remote_code": TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code}
    token = os.environ.get("HF_TOKEN")  # from the environment only; never logged
    if token:
        kw["token"] = token
    return kw


def load_tokenizer(name_or_path: str, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **_hub_kwargs(trust_remote_code))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load tokenizer: {str(e).splitlines()[0]}", name_or_path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name_or_path: str, dtype: str = "auto", trust_remote_code: bool | None = None, device: str | None = None):
    """A causal LM from a local directory or hub ID, weights as safetensors only."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, use_safetensors=True, **_hub_kwargs(trust_remote_code)
        )
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load model: {str(e).splitlines()[0]}", name_or_path) from None
    if device:
        model.to(device)
    return model


def resolve_template(tokenizer, template: str = "auto") -> str:
    """'auto' means the tokenizer's chat template when it has one, else the paper's [INST] format."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "inst"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("--template chat: the tokenizer has no chat template")
    if template not in TEMPLATES and "{instruction}" not in template:
        raise InputError(f"unknown template '{template}': use one of {', '.join(TEMPLATES)} or a format string with {{instruction}}")
    return template


def format_prompt(tokenizer, instruction: str, template: str = "auto", system: str | None = None) -> str:
    """The text up to where the assistant's response starts (user turn plus generation prompt).

    Special tokens the template writes (e.g. BOS) are part of the text; encode it with
    `encode_prompt`, which does not add them a second time.
    """
    template = resolve_template(tokenizer, template)
    if template == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": instruction}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if template == "raw":
        return instruction
    fmt = INST_TEMPLATE if template == "inst" else template
    return fmt.replace("{instruction}", instruction)


def encode_prompt(tokenizer, prompt_text: str, template: str = "auto") -> list[int]:
    """Token ids of a formatted prompt.

    Chat templates write their own BOS; other formats get whatever special tokens the
    tokenizer adds by itself (BOS for Llama, nothing for Qwen).
    """
    template = resolve_template(tokenizer, template)
    return tokenizer(prompt_text, add_special_tokens=template != "chat")["input_ids"]


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a response segment (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def refusal_token_id(tokenizer, phrase: str = "Sorry") -> int:
    """The id trained by RTO: the first token of `phrase` as it starts a response."""
    ids = encode_text(tokenizer, phrase.lstrip())
    if not ids:
        raise InputError(f"refusal phrase '{phrase}' encodes to no tokens")
    if len(ids) > 1:
        warnings.warn(
            f"refusal phrase {phrase!r} is {len(ids)} tokens for this tokenizer; RTO trains its first token "
            f"{tokenizer.convert_ids_to_tokens(ids[0])!r}",
            stacklevel=2,
        )
    return ids[0]


def refusal_token_ids(tokenizer, phrase: str = "Sorry") -> list[int]:
    """Every single-token form of the phrase's start: `Sorry` and ` Sorry` are different tokens."""
    found = []
    for form in (phrase.lstrip(), " " + phrase.lstrip()):
        ids = encode_text(tokenizer, form)
        if ids and ids[0] not in found:
            # A leading-space form that splits into a lone space token is not a refusal token.
            if form.startswith(" ") and tokenizer.decode([ids[0]]).strip() == "":
                continue
            found.append(ids[0])
    return found
