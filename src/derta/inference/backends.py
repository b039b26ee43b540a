"""Choosing a generation backend by name: hf, vllm or openai (`--backend`, and `hf:PATH`-style specs)."""

from __future__ import annotations

from derta.inference.base import Backend
from derta.inference.endpoint import OpenAIBackend
from derta.inference.hf import HFBackend
from derta.inference.policy import RefusalPolicy
from derta.inference.vllm import VLLMBackend
from derta.io import InputError

BACKENDS = ("hf", "vllm", "openai")


def parse_backend_spec(spec: str) -> tuple[str, str]:
    """'hf:PATH' / 'vllm:PATH' / 'openai:MODEL' -> (kind, model)."""
    kind, sep, model = spec.partition(":")
    if not sep or kind not in BACKENDS or not model:
        raise InputError(f"bad backend spec '{spec}': use hf:PATH, vllm:PATH or openai:MODEL")
    return kind, model


def make_backend(
    kind: str,
    model,
    tokenizer=None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    template: str = "auto",
    system: str | None = None,
    dtype: str = "auto",
    base_url: str | None = None,
    extra: dict | None = None,
    device: str | None = None,
    tensor_parallel_size: int = 1,
    policy: RefusalPolicy | None = None,
    show_refusal_tokens: bool = False,
    cpu_bf16: str = "off",
) -> Backend:
    """A backend by name; `model` is a path or hub ID (hf, vllm), a loaded model (hf), or a model name (openai).

    `device`: where the hf backend loads the model (default cuda if there is one, else cpu);
    `tensor_parallel_size`: GPUs vLLM splits the model over; `policy`: thresholds / biases on the refusal tokens;
    `cpu_bf16`: the hf backend's bf16 autocast on a CPU (auto | on | off, `models.precision`).
    """
    if kind == "hf":
        return HFBackend(
            model,
            tokenizer,
            batch_size,
            max_new_tokens,
            template,
            system,
            dtype,
            device,
            policy,
            show_refusal_tokens,
            cpu_bf16=cpu_bf16,
        )
    if kind == "vllm":
        return VLLMBackend(
            model,
            max_new_tokens=max_new_tokens,
            template=template,
            system=system,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            policy=policy,
            show_refusal_tokens=show_refusal_tokens,
        )
    if policy is not None:
        raise InputError("--calibration sets the model's own next-token probabilities: use --backend hf or vllm")
    if kind == "openai":
        return OpenAIBackend(
            model, base_url, batch_size=batch_size, max_new_tokens=max_new_tokens, system=system, extra=extra
        )
    raise InputError(f"unknown backend '{kind}': use one of {', '.join(BACKENDS)}")
