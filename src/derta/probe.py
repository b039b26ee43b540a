"""The refusal-position probe: how likely is the model to start refusing at each point of a harmful response?

One teacher-forced forward pass over prompt + response gives, at each of the |r̂|+1 response
positions (right after the prompt, through right after the last response token), the probability
that the next token is the refusal token. A model with refusal position bias is high at the start
and near zero inside the response; DeRTa should keep it high throughout. No generation loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .io import InputError, pyplot, read_jsonl, write_json, write_png
from .models import encode_prompt, encode_text, format_prompt, load_model, load_tokenizer, refusal_token_ids, resolve_template


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask and position_ids for left-padded sequences (positions start at 0 per row)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def refusal_probabilities(model, tokenizer, pairs: list[tuple[str, str]], refusal_phrase: str = "Sorry",
                          template: str = "auto", batch_size: int = 16, progress: bool = False,
                          shard=None) -> list[list[float]]:
    """For each (instruction, response): P(next token is a refusal token) at each of the |response|+1 positions.

    With a `shard` (generate.Shard, several processes), each process runs every world-th batch and
    all of them get every result back.

    The refusal tokens are the transition DeRTa trains (`models.refusal_transition`): its start
    form ("Sorry") and its mid form (" Sorry", or " sorry" where " Sorry" is two fragments); for a
    model trained with refusal tokens (`data build --refusal-tokens`), those tokens.
    """
    ids = refusal_token_ids(tokenizer, refusal_phrase)
    return [[sum(p) for p in ex] for ex in
            token_probabilities(model, tokenizer, pairs, ids, template, batch_size, progress, shard, "probe")]


@torch.no_grad()
def token_probabilities(model, tokenizer, pairs: list[tuple[str, str]], token_ids: list[int], template: str = "auto",
                        batch_size: int = 16, progress: bool = False, shard=None,
                        desc: str = "probe") -> list[list[list[float]]]:
    """For each (instruction, response): P(next token = t) for each t of `token_ids`, at each of the |response|+1
    positions (result[example][position][k]). One teacher-forced pass; no generation loop."""
    template = resolve_template(tokenizer, template)
    refusal = torch.tensor(token_ids)
    encoded = []
    for instruction, response in pairs:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, instruction, template), template)
        encoded.append((prompt + encode_text(tokenizer, response), len(encode_text(tokenizer, response))))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[float] | None] = [None] * len(encoded)
    # Similar lengths together: less padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if shard is not None:
        batches = [b for k, b in enumerate(batches) if shard.mine(k)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    for batch in batches:
        ids, mask, positions = left_pad([encoded[i][0] for i in batch], tokenizer.pad_token_id)
        keep = max(encoded[i][1] for i in batch) + 1
        # Left padding puts every response at the end, so only the last `keep` logits are needed.
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       logits_to_keep=keep).logits[:, -keep:]
        probs = torch.softmax(logits.float(), dim=-1)[..., refusal.to(device)].cpu()
        for row, i in enumerate(batch):
            n = encoded[i][1]
            # The last n+1 logits: after the prompt's last token, then after each response token.
            results[i] = probs[row, keep - n - 1:].tolist()
    if was_training:
        model.train()
    if shard is not None and shard.world > 1:
        for i, probs in shard.gather([(i, p) for i, p in enumerate(results) if p is not None]):
            results[i] = probs
    return results  # type: ignore[return-value]


def average_curve(per_example: list[list[float]], points: int = 11) -> list[dict]:
    """Average the examples at relative positions 0.0 .. 1.0 (linear interpolation within each example)."""
    if points < 5:
        raise InputError("--points must be at least 5")
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for probs in per_example:
        xs = np.linspace(0.0, 1.0, len(probs)) if len(probs) > 1 else np.zeros(1)
        curves.append(np.interp(grid, xs, probs) if len(probs) > 1 else np.full(points, probs[0]))
    mean = np.mean(curves, axis=0)
    return [{"position_frac": round(float(f), 4), "refusal_prob": float(p)} for f, p in zip(grid, mean)]


def probe_rows(path: str, field: str | None = None, limit: int | None = None) -> tuple[list[tuple[str, str]], str]:
    """(instruction, response) pairs from a JSONL file; the response field defaults to harmful_response, else response."""
    rows = read_jsonl(path, with_lines=True)
    if field is None:
        field = "harmful_response" if "harmful_response" in rows[0][1] else "response"
    pairs = []
    for lineno, row in rows[:limit] if limit else rows:
        for name in ("instruction", field):
            if not isinstance(row.get(name), str):
                raise InputError(f"row needs a string field '{name}'", path, lineno)
        pairs.append((row["instruction"], row[field]))
    return pairs, field


def probe(model, tokenizer, pairs: list[tuple[str, str]], refusal_phrase: str = "Sorry", template: str = "auto",
          batch_size: int = 16, points: int = 11, progress: bool = False, shard=None) -> dict:
    per_example = refusal_probabilities(model, tokenizer, pairs, refusal_phrase, template, batch_size, progress, shard)
    curve = average_curve(per_example, points)
    return {
        "n_examples": len(pairs),
        "refusal_phrase": refusal_phrase,
        "refusal_tokens": [tokenizer.decode([i]) for i in refusal_token_ids(tokenizer, refusal_phrase)],
        "mean_refusal_prob": float(np.mean([c["refusal_prob"] for c in curve])),
        "curve": curve,
        "per_example": [{"instruction": q, "refusal_probs": [round(p, 6) for p in probs]}
                        for (q, _), probs in zip(pairs, per_example)],
    }


def plot_curves(curves: dict[str, list[dict]], path: str | Path, title: str = "Refusal probability inside the response") -> None:
    """One line per named curve: refusal probability against relative response position."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c["position_frac"] for c in curve], [c["refusal_prob"] for c in curve], marker="o", label=name)
    ax.set_xlabel("position in harmful response (fraction of its tokens)")
    ax.set_ylabel("P(next token = refusal)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_png(path, fig)


def run_probe(model_path: str, data: str, out: str, plot: str | None = None, refusal_phrase: str = "Sorry",
              template: str = "auto", batch_size: int = 16, field: str | None = None, points: int = 11,
              limit: int | None = None) -> dict:
    if points < 5:
        raise InputError("--points must be at least 5")
    from .generate import Shard

    pairs, field = probe_rows(data, field, limit)
    shard = Shard.from_env()  # several processes (torchrun / accelerate launch): each probes every world-th batch
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, device=shard.device)
    result = {"model": str(model_path), "data": str(data), "field": field,
              **probe(model, tokenizer, pairs, refusal_phrase, template, batch_size, points, progress=shard.main,
                      shard=shard)}
    if shard.main:
        write_json(out, result)
        if plot:
            plot_curves({Path(model_path).name or str(model_path): result["curve"]}, plot)
    shard.wait()
    return result
