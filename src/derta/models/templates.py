"""How a question becomes a prompt, and how a response ends.

One place decides the prompt format (the tokenizer's chat template, the paper's `[INST]` format, a
custom format string, or raw text), so that training, probing and evaluation all see the same thing.
"""

from __future__ import annotations

from derta.io import InputError

# The paper's format for base models without a chat template (as in its released data).
INST_TEMPLATE = "[INST] {instruction} [\\INST]"
TEMPLATES = ("auto", "chat", "inst", "raw")


_RENDERED: set = set()  # (tokenizer, template text, system prompt) already rendered once


def check_chat_template(tokenizer, system: str | None = None) -> None:
    """Render the tokenizer's chat template once, with a user turn (after `system`, if given) and an assistant
    reply: a template that does not compile, or raises (some refuse a system role), is one line at the start
    rather than a traceback in the middle of a run."""
    key = (id(tokenizer), str(tokenizer.chat_template), system)
    if key in _RENDERED:
        return
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": "Hi"}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": "Hello"}], tokenize=False)
    except Exception as e:  # jinja2's syntax and runtime errors, or what the template itself raises
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        with_system = " with a system prompt (--system)" if system else ""
        raise InputError(
            f"the tokenizer's chat template fails{with_system}: {detail}; fix chat_template, or use --template inst",
            getattr(tokenizer, "name_or_path", None) or None,
        ) from None
    if not isinstance(text, str):
        raise InputError("the tokenizer's chat template does not render text", getattr(tokenizer, "name_or_path", None))
    _RENDERED.add(key)


def resolve_template(tokenizer, template: str = "auto") -> str:
    """'auto' means the tokenizer's chat template when it has one, else the paper's [INST] format; a chat template
    is tried once first (`check_chat_template`)."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "inst"
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise InputError("--template chat: the tokenizer has no chat template")
    if template == "chat":
        check_chat_template(tokenizer)
        return template
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
