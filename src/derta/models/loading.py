"""Loading models and tokenizers from a local directory or a hub ID, strictly.

A local-looking name that does not exist is reported as such (not as a hub error), weight files are
checked for truncation before any slow work, weights load from safetensors only, and a model's own
code runs only with `derta --trust-remote-code`.
"""

from __future__ import annotations

import glob
import json
import os

from derta.hub import check_hub_name
from derta.io import InputError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # what load_model accepts
# Off unless the user asks (`derta --trust-remote-code ...` sets it).
TRUST_REMOTE_CODE = False


def hub_kwargs(trust_remote_code: bool | None) -> dict:
    kw = {"trust_remote_code": TRUST_REMOTE_CODE if trust_remote_code is None else trust_remote_code}
    token = os.environ.get("HF_TOKEN")  # from the environment only; never logged
    if token:
        kw["token"] = token
    return kw


def looks_local(name: str) -> bool:
    """A path rather than a hub ID ("org/name"): absolute, relative with ./ or ~, or with more than one '/'."""
    name = str(name)
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or "\\" in name
        or os.path.exists(name)
    )


def check_model_dir(name_or_path: str, want: str = "model") -> None:
    """Local-looking names are checked here, so a typo is not reported as a hub (network) error."""
    if not looks_local(name_or_path):
        check_hub_name(str(name_or_path), want)
        return
    path = os.path.expanduser(str(name_or_path))
    if not os.path.exists(path):
        raise InputError("no such directory (a local path; hub IDs look like org/name)", name_or_path)
    if not os.path.isdir(path):
        raise InputError(
            f"not a directory: --model takes a {want} directory saved with save_pretrained "
            "(for a .gguf file run derta convert first)",
            name_or_path,
        )
    if not os.listdir(path):
        raise InputError(
            f"the directory is empty: expected a {want} saved with save_pretrained or derta convert", name_or_path
        )
    if want == "model" and not any(
        os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")
    ):
        raise InputError(
            "no config.json here: not a model directory saved with save_pretrained or derta convert", name_or_path
        )


def safetensors_problem(path) -> str | None:
    """Why a .safetensors file is unreadable (None when its header is sound and the file holds every byte it lists).

    Reads the header only: a file cut short (killed mid-save, full disk) or overwritten is found without loading it.
    """

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

    check_model_dir(name_or_path)
    if os.path.isdir(os.path.expanduser(str(name_or_path))):
        for f in sorted(glob.glob(os.path.join(os.path.expanduser(str(name_or_path)), "*.safetensors"))):
            if problem := safetensors_problem(f):
                raise InputError(f"cannot load model: {problem}", name_or_path)


def nonfinite_tensors(model) -> list[str]:
    """Names of the model's floating-point parameters holding a NaN or an infinity (the local shard of a sharded
    one; parameters not materialised here, on the meta device, are skipped)."""
    import torch

    bad = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = p.to_local() if hasattr(p, "to_local") else p
            if t.is_floating_point() and t.numel() and t.device.type != "meta" and not torch.isfinite(t).all():
                bad.append(name)
    return bad


def describe_nonfinite(names: list[str]) -> str:
    many = len(names) > 1
    return (
        f"{len(names)} weight tensor{'s hold' if many else ' holds'} NaN or infinite values "
        f"({names[0]}{', ...' if many else ''})"
    )


def load_tokenizer(name_or_path: str, trust_remote_code: bool | None = None):
    from transformers import AutoTokenizer

    check_model_dir(name_or_path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **hub_kwargs(trust_remote_code))
    except Exception as e:  # the directory's files are the input: any failure to read them is theirs
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load tokenizer: {detail}", name_or_path) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    try:  # once, here: a tokenizer_config.json value of the wrong type otherwise fails mid-run
        tok.decode(tok("Sorry, I can't.", add_special_tokens=True)["input_ids"])
    except Exception as e:
        detail = " ".join(str(e).split())[:200] or type(e).__name__
        raise InputError(f"cannot use tokenizer: {type(e).__name__}: {detail}", name_or_path) from None
    return tok


def load_model(
    name_or_path: str, dtype: str = "auto", trust_remote_code: bool | None = None, device: str | None = None
):
    """A causal LM from a local directory or hub ID, weights as safetensors only; refused (one line) when its
    weights disagree with its config.json (tensors missing, left over or of another shape) or are not finite."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_files(name_or_path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype
    ]
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=torch_dtype,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported below, by name and shape
            **hub_kwargs(trust_remote_code),
        )
    except Exception as e:  # the directory's files are the input: any failure to read them is theirs
        # A truncated or overwritten weights file (killed mid-save, full disk) lands here too.
        detail = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"cannot load model: {detail}", name_or_path) from None
    check_loaded(model, info, name_or_path)
    if device:
        model.to(device)
    return model


def check_loaded(model, info: dict, name_or_path) -> None:
    """Weights that do not fill the architecture config.json describes would leave layers random (or drop some)
    without a word from transformers at derta's log level; non-finite weights would generate nothing (or NaN)."""
    layers = getattr(model.config, "num_hidden_layers", None)
    said = f"config.json says {layers} layers" if layers is not None else "config.json"
    if info.get("mismatched_keys"):
        key, ours, theirs = next(iter(info["mismatched_keys"]))[:3]
        raise InputError(
            f"the weights do not fit config.json: {key} is {list(ours)} in the weights file(s) but {list(theirs)} "
            f"in the architecture config.json describes ({len(info['mismatched_keys'])} tensors differ)",
            name_or_path,
        )
    for kind, what in (
        ("missing_keys", "tensors the architecture it describes needs are not in the weights, so they would be random"),
        ("unexpected_keys", "tensors in the weights have no place in the architecture it describes"),
    ):
        keys = sorted(info.get(kind) or ())
        if keys:
            raise InputError(
                f"the weights do not fit config.json ({said}): {len(keys)} {what} ({keys[0]}, ...); "
                "config.json must be the one saved with the weights",
                name_or_path,
            )
    for key, value in model.config.to_dict().items():
        # Dropout probabilities act only in training, where a wrong one fails deep inside the first step.
        if ("dropout" in key or key.endswith("pdrop")) and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1
        ):
            raise InputError(f"config.json: {key} must be a probability in [0, 1), not {value!r}", name_or_path)
    if bad := nonfinite_tensors(model):
        raise InputError(f"cannot use this model: {describe_nonfinite(bad)}", name_or_path)
