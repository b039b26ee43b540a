"""How a question becomes a prompt, and how a response ends.

One place decides the prompt format (the tokenizer's chat template, the paper's `[INST]` format, a
custom format string, or raw text), so that training, probing and evaluation all see the same thing.
"""

from __future__ import annotations

from derta.io import InputError

# The paper's format for base models without a chat template (as in its released data).
INST_TEMPLATE = "[INST] {instruction} [\\INST]"
TEMPLATES = ("auto", "chat", "inst", "raw")


def resolve_template(tokenizer, template: str = "auto") -> str:
    """'auto' means the tokenizer's chat template when it has one, else the paper's [INST] format."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "inst"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("--template chat: the tokenizer has no chat template")
    if template not in TEMPLATES and "{instruction}" not in template:
        raise InputError(
            f"unknown template '{template}': use one of {', '.join(TEMPLATES)} or a format string with {{instruction}}"
        )
    return template


def format_prompt(tokenizer, instruction: str, template: str = "auto", system: str | None = None) -> str:
    """The text up to where the assistant's response starts (user turn plus generation prompt).

    Special tokens the template writes (e.g. BOS) are part of the text; encode it with
    `encode_prompt`, which does not add them a second time.
    """
    template = resolve_template(tokenizer, template)
    if template == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": instruction}
        ]
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


def end_of_turn_ids(tokenizer, template: str = "auto") -> list[int]:
    """The token(s) that close an assistant turn: what the chat template writes after a message.

    Not always eos: a ChatML template ends a turn with <|im_end|> while a Qwen base checkpoint's
    eos is <|endoftext|>. Trailing whitespace after the marker (ChatML's newline) is not part of
    it. Formats without a chat template end with eos.
    """
    template = resolve_template(tokenizer, template)
    if template == "chat":
        sentinel = "DERTA-END-OF-TURN-SENTINEL"
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}], tokenize=False
        )
        if sentinel in text:
            suffix = text[text.rindex(sentinel) + len(sentinel) :].strip()
            if suffix:
                return encode_text(tokenizer, suffix)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token and its template marks no end of turn")
    return [tokenizer.eos_token_id]
