"""CPU bf16: whether this CPU does bf16 matrix arithmetic in hardware, and the autocast derta trains and generates in.

Detected, never assumed: torch's own probe (`torch.cpu._is_avx512_bf16_supported`, `_is_amx_tile_supported`) and
the kernel's /proc/cpuinfo flags (avx512_bf16, amx_bf16) must agree that the instructions exist. Without them
bf16 matmuls are emulated and slower than float32, so `auto` stays in float32 there.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

CPU_BF16_CHOICES = ("auto", "on", "off")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> set[str]:
    """The CPU feature flags the kernel reports (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16_features() -> list[str]:
    """The bf16 matrix instructions this CPU has, by both torch's probe and /proc/cpuinfo ([] when none)."""
    import torch

    probes = {
        "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False),
        "amx_bf16": getattr(torch.cpu, "_is_amx_tile_supported", lambda: False),
    }
    flags = cpu_flags()
    return [name for name in BF16_FLAGS if name in flags and probes[name]()]


def resolve_cpu_bf16(setting: str, device) -> bool:
    """Whether CPU work runs under bf16 autocast: `on`, `off`, or `auto` (on when the CPU has bf16 hardware).

    Never on a GPU device: there `--bf16` (Trainer's mixed precision) is the switch.
    """
    if setting not in CPU_BF16_CHOICES:
        raise ValueError(f"cpu_bf16 must be one of {', '.join(CPU_BF16_CHOICES)}, not {setting!r}")
    if getattr(device, "type", str(device)) != "cpu" or setting == "off":
        return False
    return setting == "on" or bool(cpu_bf16_features())


def cpu_autocast(enabled: bool):
    """bf16 autocast on the CPU when `enabled`, else a no-op (float32 exactly as without it)."""
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def generation_precision(setting: str, backend: str = "hf", device=None) -> dict:
    """What a generation run's manifest records about precision: {"cpu_bf16": True} when the hf backend generates
    under bf16 autocast (its greedy text can differ from float32's, so a resume must not mix the two), else {} (so
    the manifests of float32 runs stay as they were before the setting existed)."""
    import torch

    if backend != "hf":
        return {}
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"cpu_bf16": True} if resolve_cpu_bf16(setting, device) else {}
