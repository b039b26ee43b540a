"""The machine's own limit, and how close a training step gets to it (`derta bench`'s "limit" part).

Peak: the best rate of square matrix multiplies (`size` x `size` by `size` x `size`, 2·size³ FLOPs each), in
float32 and, where the hardware does bf16 (a GPU, or a CPU with AVX512-BF16 / AMX), in bf16; best of `repeats`.

Model FLOPs of a training step, counted from the model itself (forward hooks on every linear layer during one
forward of the loss on a probe row, then scaled to the step's rows):

    Σ over linear layers   2·r·in·out                  forward
                         + 2·r·in·out   if backprop reaches the layer's input   (activation gradient)
                         + 2·r·in·out   if the layer's weight is trained        (weight gradient)
    + Σ over attention layers, per row of n tokens   4·(n(n+1)/2)·d_q · (1 + 2 if backprop reaches it)

r is the number of positions the layer runs on: every real token for the decoder body, the labelled
positions for the output projection. With every weight trained this is the usual 6·N per token (plus causal
attention); with LoRA on the top k layers the frozen layers below count 2·N only (no gradient reaches them)
and the frozen weights above count 4·N (activation gradient, no weight gradient). Padding, recomputation
(checkpointed logits) and the full-logits loss's unlabelled positions are not counted: they are work, not
model FLOPs, so the fraction of peak is what a step's useful arithmetic achieves.
"""

from __future__ import annotations

import time

PEAK_SIZES = (512, 1024, 2048)  # the largest square matmul the model's own shapes are near, and the BLAS sweet spot


def matmul_rate(dtype, size: int, repeats: int = 3, device="cpu") -> float:
    """Best-of-`repeats` FLOP/s of size x size matmuls in `dtype` (each repeat times enough products for ~0.1 s)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b  # warm-up: first call allocates and picks the kernel
    sync()
    start = time.perf_counter()
    a @ b
    sync()
    number = max(1, int(0.1 / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / number)
    return 2 * size**3 / best


def machine_peak(model_size: int, repeats: int = 3, device="cpu", sizes=PEAK_SIZES) -> dict:
    """{precision: {"flops": best FLOP/s, "by_size": {size: FLOP/s}}} over `sizes` and the model's `model_size`;
    bf16 only where the hardware does it."""
    import torch

    from derta.models.precision import cpu_bf16_features

    dtypes = {"float32": torch.float32}
    if torch.device(device).type == "cuda" or cpu_bf16_features():
        dtypes["bfloat16"] = torch.bfloat16
    sizes = sorted({min(max(model_size, 64), 4096), *sizes})
    peak = {}
    for name, dtype in dtypes.items():
        by_size = {str(s): round(matmul_rate(dtype, s, repeats, device)) for s in sizes}
        peak[name] = {"flops": max(by_size.values()), "by_size": by_size}
    return peak


def flop_profile(model) -> dict:
    """Per-token model FLOPs of a training step, split by where they run (see the module docstring).

    Measured with forward hooks during one loss forward on a 16-token probe row whose every position is
    labelled; backward is not run, the model's weights and gradients are left as they were.
    """
    import torch

    from derta.train.losses import _causal_lm_parts, batch_loss

    _, head, lm = _causal_lm_parts(model)
    seen = {"body": [0, 0], "head": [0, 0], "attention_layers": 0, "attention_backprop_layers": 0}

    def on_linear(module, args, output):
        rows = args[0].numel() // module.in_features
        part = seen["head" if module is head else "body"]
        per = 2 * rows * module.in_features * module.out_features
        part[0] += per
        part[1] += per * (bool(args[0].requires_grad) + bool(module.weight.requires_grad))

    def on_attention(module, args, output):
        seen["attention_layers"] += 1
        out = output[0] if isinstance(output, tuple) else output
        seen["attention_backprop_layers"] += bool(out.requires_grad)

    hooks = [m.register_forward_hook(on_linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [m.register_forward_hook(on_attention) for n, m in model.named_modules() if n.endswith("self_attn")]
    n = 16
    device = next(model.parameters()).device
    ids = torch.arange(3, 3 + n, device=device)[None] % lm.config.vocab_size
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": ids,
        "loss_weight": torch.ones(1, device=device),
        "is_rto": torch.zeros(1, dtype=torch.bool, device=device),
    }
    try:
        with torch.enable_grad():
            batch_loss(model, batch, "chunked")
    finally:
        for h in hooks:
            h.remove()
    config = lm.config
    d_q = config.num_attention_heads * (
        getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    )
    return {
        "body_forward": seen["body"][0] / n,
        "body_backward": seen["body"][1] / n,
        "head_forward": seen["head"][0] / (n - 1),
        "head_backward": seen["head"][1] / (n - 1),
        "attention_layers": seen["attention_layers"],
        "attention_backprop_layers": seen["attention_backprop_layers"],
        "d_q": d_q,
        "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
    }


def step_flops(profile: dict, rows: list[tuple[int, int]]) -> float:
    """Model FLOPs of a training step over `rows` = [(tokens, labelled positions)] (see the module docstring)."""
    p = profile
    tokens, labelled = sum(r[0] for r in rows), sum(r[1] for r in rows)
    linear = tokens * (p["body_forward"] + p["body_backward"]) + labelled * (p["head_forward"] + p["head_backward"])
    pairs = sum(n * (n + 1) / 2 for n, _ in rows)
    attention = 4 * pairs * p["d_q"] * (p["attention_layers"] + 2 * p["attention_backprop_layers"])
    return linear + attention


def fraction_row(name: str, flops: float, seconds: float, precision: str, peak: dict) -> dict:
    """One training path's achieved model FLOP/s and its fraction of the measured peak for its precision."""
    rate = flops / seconds
    return {
        "path": name,
        "precision": precision,
        "model_flops": round(flops),
        "seconds": round(seconds, 4),
        "achieved_flops": round(rate),
        "peak_flops": peak[precision]["flops"],
        "fraction_of_peak": round(rate / peak[precision]["flops"], 4),
    }


def limit(results: dict, model, repeats: int, batch: int, seq: int, skewed: list[tuple[int, int]]) -> dict:
    """The machine's matmul peak and each timed training path's model FLOP/s as a fraction of it: the loss step's
    `batch` rows of `seq` tokens (half labelled), and the packing and trunk parts' `skewed` rows, as
    [(tokens, labelled positions)]."""
    from derta.models.precision import cpu_bf16_features

    device = next(model.parameters()).device
    profile = flop_profile(model)
    peak = machine_peak(getattr(model.config, "intermediate_size", model.config.hidden_size), repeats, device)
    loss_rows = [(seq, seq - seq // 2)] * batch
    paths = [
        fraction_row(
            f"one step, {name} (batch {batch} x {seq})",
            step_flops(profile, loss_rows),
            r["step_s"],
            "float32",
            peak,
        )
        for name, r in (("full logits", results["loss"]["full"]), ("labelled positions", results["loss"]["chunked"]))
    ]
    for name, r in results["packing"].items():
        if isinstance(r, dict) and "tokens_per_s" in r:
            flops = step_flops(profile, skewed)
            paths.append(fraction_row(f"skewed mix + SGD, {name}", flops, r["seconds"], r["precision"], peak))
    if trunk := results.get("trunk"):
        # The cached epoch computes no forward below the trained layers: its FLOPs are the trained layers' share.
        p, frozen = trunk["profile"], trunk["layers"] - trunk["lora_layers"]
        computed = {
            **p,
            "body_forward": p["body_forward"] * trunk["lora_layers"] / trunk["layers"],
            "attention_layers": p["attention_layers"] - frozen,
        }
        top = f"LoRA top {trunk['lora_layers']} of {trunk['layers']} layers"
        for name in ("recomputed", "cached", "cached_bf16"):
            if name in trunk:
                paths.append(
                    fraction_row(
                        f"skewed mix + SGD, {top}, trunk {name.replace('_', ', ')}",
                        step_flops(p if name == "recomputed" else computed, skewed),
                        trunk[name]["seconds"],
                        trunk[name]["precision"],
                        peak,
                    )
                )
    return {"peak": peak, "cpu_bf16_features": cpu_bf16_features(), "profile": profile, "paths": paths}


def limit_markdown(limit: dict) -> list[str]:
    """The fraction-of-peak table of bench.md."""
    peak = ", ".join(
        f"{name} {v['flops'] / 1e9:.1f} GFLOP/s (sizes {', '.join(v['by_size'])})" for name, v in limit["peak"].items()
    )
    lines = [
        f"Machine matmul peak (best of square matmuls): {peak}. CPU bf16 hardware: "
        f"{', '.join(limit['cpu_bf16_features']) or 'none'}.",
        f"Model FLOPs per step counted from the model (forward 2·N over all weights, activation gradient 2·N where "
        f"backprop reaches, weight gradient 2·N for trained weights, plus causal attention); trained parameters "
        f"{limit['profile']['trained_params']:,} of {limit['profile']['params']:,}.",
        "",
        "| training path | precision | model GFLOP/step | s/step | achieved GFLOP/s | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for r in limit["paths"]:
        lines.append(
            f"| {r['path']} | {r['precision']} | {r['model_flops'] / 1e9:.3f} | {r['seconds']} | "
            f"{r['achieved_flops'] / 1e9:.2f} | {r['fraction_of_peak']:.1%} |"
        )
    return lines
