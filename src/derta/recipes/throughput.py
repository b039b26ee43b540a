"""`derta bench`'s training-throughput parts: tokens/s of the same rows trained two ways.

packing     padded batches vs padding-free (packed) ones, on a length-skewed DeRTa-like mixture; packed under
            one block mask vs attended row by row (train.attention); float32 vs bf16 autocast where the CPU does it
trunk       LoRA on the top layers: a later epoch with the frozen layers recomputed vs their states kept from
            the first (train.trunk); the kept one also under bf16 autocast, as the real-model demo trains
"""

from __future__ import annotations

import random
import time
from contextlib import contextmanager

from derta.io import InputError
from derta.models.precision import cpu_autocast, resolve_cpu_bf16
from derta.recipes.limit import flop_profile


def skewed_rows(cfg, vocab: int) -> list[dict]:
    """The DeRTa mix in miniature: per batch, 3 of 4 rows short helpful ones, 1 of 4 a long RTO row."""
    rng = random.Random(cfg.seed)
    rows = []
    for i in range(cfg.batch * cfg.pack_batches):
        rto = i % 4 == 3 or (cfg.batch < 4 and i % cfg.batch == cfg.batch - 1)
        n = rng.randint(*(cfg.long if rto else cfg.short))
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt = n // 2 if rto else n // 3
        labels = [-100] * prompt + ([5] * (n - prompt) if rto else ids[prompt:])
        rows.append(
            {
                "input_ids": ids,
                "labels": labels,
                "loss_weight": 0.5 if rto else 1.0,
                "kind": "rto" if rto else "helpful",
            }
        )
    rng.shuffle(rows)
    return rows


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def timed_passes(model, state: dict, batches: list[dict], repeats: int, warm_up: int, loss_of, tokens: int):
    """SGD passes over `batches` with `loss_of(batch)`, each from the weights `state`: one untimed warm-up over the
    first `warm_up` batches, then `repeats` timed ones, the fastest of which counts (the CPU may be shared).
    Returns ({seconds, pass_seconds, tokens_per_s}, the timed passes' first-batch loss)."""
    import torch

    passes, first = [], None
    for timed in [False] + [True] * repeats:
        model.load_state_dict(state)
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        start = time.perf_counter()
        for i, batch in enumerate(batches if timed else batches[:warm_up]):
            loss = loss_of(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if timed and i == 0:
                first = float(loss.detach())
        if timed:
            passes.append(time.perf_counter() - start)
    seconds = min(passes)
    figures = {
        "seconds": round(seconds, 3),
        "pass_seconds": [round(t, 3) for t in passes],
        "tokens_per_s": round(tokens / seconds, 1),
    }
    return figures, first


@contextmanager
def attention(model, rows: bool):
    """`model` attends packed rows one by one (train.attention) or under sdpa's block mask, restored afterwards;
    yields whether row attention is on (only an sdpa model can take it)."""
    from derta.train.attention import use_row_attention

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    try:
        yield rows and use_row_attention(base)
    finally:
        base.set_attn_implementation(before)


def packing_throughput(cfg, model) -> dict:
    """Training tokens/s (forward + backward + SGD step), padded batches vs packed, same rows in the same batches.

    Every variant starts from the same weights each pass; the first batch's loss is compared (same loss, row by
    row). packed_rows attends row by row (sdpa models only), and so does packed_bf16 where it can (derta train's
    defaults).
    """
    from derta.train.collators import PackCollator, PadCollator
    from derta.train.losses import batch_loss

    rows = skewed_rows(cfg, model.config.vocab_size)
    device = next(model.parameters()).device
    batches = [rows[i : i + cfg.batch] for i in range(0, len(rows), cfg.batch)]
    tokens = sum(len(r["input_ids"]) for r in rows)
    result, first_loss = {}, {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    variants = [("padded", PadCollator(0), False, False), ("packed", PackCollator(), False, False)]
    variants.append(("packed_rows", PackCollator(), False, True))
    if resolve_cpu_bf16("auto", device):
        variants.append(("packed_bf16", PackCollator(), True, True))  # bf16 autocast, as derta train does by default
    for name, collate, bf16, rows_on in variants:
        collated = [to_device(collate(b), device) for b in batches]

        def loss_of(batch, bf16=bf16):
            with cpu_autocast(bf16):
                return batch_loss(model, batch, "chunked")[0]

        with attention(model, rows_on) as used:
            if name == "packed_rows" and not used:
                continue  # not an sdpa model: derta train attends as the model does, as packed_bf16 here
            # One untimed warm-up step, then the timed passes.
            figures, first_loss[name] = timed_passes(model, state, collated, cfg.repeats, 1, loss_of, tokens)
        padded_tokens = sum(len(b) * max(len(r["input_ids"]) for r in b) for b in batches)
        result[name] = {
            "precision": "bfloat16" if bf16 else "float32",
            "row_attention": used,
            **figures,
            "positions_computed": padded_tokens if name == "padded" else tokens,
            "first_batch_loss": first_loss[name],
        }
    model.load_state_dict(state)
    result["real_tokens"] = tokens
    result["abs_loss_diff"] = abs(first_loss["packed"] - first_loss["padded"])
    if "packed_rows" in result:
        result["rows_abs_loss_diff"] = abs(first_loss["packed_rows"] - first_loss["packed"])
    if "packed_bf16" in result:
        # The float32 variant that differs from packed_bf16 in precision only.
        result["bf16_versus"] = "packed_rows" if "packed_rows" in result else "packed"
        result["bf16_abs_loss_diff"] = abs(first_loss["packed_bf16"] - first_loss[result["bf16_versus"]])
    return result


def trunk_throughput(cfg, model) -> dict:
    """Training tokens/s of a later epoch with LoRA on the top layers: the frozen trunk recomputed vs kept from the
    first epoch (train.trunk.TrunkCache), packed skewed mix attended row by row, float32, SGD, the same first-batch
    loss either way; and the kept one under bf16 autocast where the CPU does it (the real-model demo's path)."""
    import copy

    from derta.train.collators import PackCollator
    from derta.train.config import DertaConfig
    from derta.train.losses import batch_loss
    from derta.train.run import _with_lora
    from derta.train.trunk import TrunkCache, trunk_start

    total = model.config.num_hidden_layers
    top = cfg.lora_layers or max(1, total // 4)
    if top >= total:
        raise InputError(f"--lora-layers {top}: the trunk part needs frozen layers below (the model has {total})")
    lora = _with_lora(copy.deepcopy(model), DertaConfig(output_dir="unused", use_lora=True, lora_layers=top))
    start, _ = trunk_start(lora)
    rows = skewed_rows(cfg, model.config.vocab_size)
    device = next(model.parameters()).device
    collated = [to_device(PackCollator()(rows[i : i + cfg.batch]), device) for i in range(0, len(rows), cfg.batch)]
    tokens = sum(len(r["input_ids"]) for r in rows)
    state = {k: v.clone() for k, v in lora.state_dict().items()}
    result, first_loss = {"lora_layers": top, "layers": total}, {}
    variants = [("recomputed", False), ("cached", False)]
    if resolve_cpu_bf16("auto", device):
        variants.append(("cached_bf16", True))
    for name, bf16 in variants:
        cache = TrunkCache(start, 2**40) if name != "recomputed" else None

        def loss_of(batch, cache=cache, bf16=bf16):
            with cpu_autocast(bf16):
                return batch_loss(lora, batch, "chunked", trunk=cache)[0]

        # The warm-up pass is the first epoch (it fills the cache); the timed ones are later epochs.
        with attention(lora, True) as rows_on:
            figures, first_loss[name] = timed_passes(lora, state, collated, cfg.repeats, len(collated), loss_of, tokens)
        result[name] = {
            "precision": "bfloat16" if bf16 else "float32",
            "row_attention": rows_on,
            **figures,
            **({"cache": cache.summary()} if cache else {}),
        }
    result["real_tokens"] = tokens
    result["abs_loss_diff"] = abs(first_loss["cached"] - first_loss["recomputed"])
    result["profile"] = flop_profile(lora)
    return result
