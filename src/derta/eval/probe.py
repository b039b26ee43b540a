"""The refusal-position probe: how likely is the model to start refusing at each point of a harmful response?

One teacher-forced forward pass over prompt + response gives, at each of the |r̂|+1 response
positions (right after the prompt, through right after the last response token), the probability
that the next token is the refusal token. A model with refusal position bias is high at the start
and near zero inside the response; DeRTa should keep it high throughout. No generation loop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from derta.data.shapes import columns
from derta.data.sources import prompt_of, read_records
from derta.inference.base import over_context, padded_forward
from derta.io import NUMERIC_RULES, InputError, check_number, pyplot, show_progress, write_png
from derta.models.refusal_tokens import REFUSAL_PHRASE, refusal_token_ids
from derta.models.templates import encode_prompt, encode_text, format_prompt, resolve_template

PROBE_POINTS = 11  # the averaged curve's points: every tenth of the response


def refusal_probabilities(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    refusal_phrase: str = REFUSAL_PHRASE,
    template: str = "auto",
    batch_size: int = 16,
    progress: bool = False,
    shard=None,
) -> list[list[float]]:
    """For each (instruction, response): P(next token is a refusal token) at each of the |response|+1 positions.

    With a `shard` (generate.Shard, several processes), each process runs every world-th batch and
    all of them get every result back.

    The refusal tokens are the transition DeRTa trains (`models.refusal_transition`): its start
    form ("Sorry") and its mid form (" Sorry", or " sorry" where " Sorry" is two fragments); for a
    model trained with refusal tokens (`data build --refusal-tokens`), those tokens.
    """
    ids = refusal_token_ids(tokenizer, refusal_phrase)
    return [
        [sum(p) for p in ex]
        for ex in token_probabilities(model, tokenizer, pairs, ids, template, batch_size, progress, shard, "probe")
    ]


def token_probabilities(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    token_ids: list[int],
    template: str = "auto",
    batch_size: int = 16,
    progress: bool = False,
    shard=None,
    desc: str = "probe",
) -> list[list[list[float]]]:
    """For each (instruction, response): P(next token = t) for each t of `token_ids`, at each of the |response|+1
    positions (result[example][position][k]). One teacher-forced pass; no generation loop."""
    template = resolve_template(tokenizer, template)
    encoded = []
    for instruction, response in pairs:
        prompt = encode_prompt(tokenizer, format_prompt(tokenizer, instruction, template), template)
        encoded.append((prompt + encode_text(tokenizer, response), len(encode_text(tokenizer, response))))
    over_context(model, [len(ids) for ids, _ in encoded], "examples", shard is None or shard.main)
    results: list[list[float] | None] = [None] * len(encoded)
    # Similar lengths together: less padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shard is not None:
        batches = [b for k, b in enumerate(batches) if shard.mine(k)]
    was_training = model.training
    model.eval()
    for batch in tqdm(batches, desc=desc, unit="batch", disable=not show_progress(progress)):
        for i, probs in zip(batch, _batch_probabilities(model, tokenizer, [encoded[i] for i in batch], token_ids)):
            results[i] = probs
    if was_training:
        model.train()
    if shard is not None and shard.world > 1:
        for i, probs in shard.gather([(i, p) for i, p in enumerate(results) if p is not None]):
            results[i] = probs
    return results  # type: ignore[return-value]


def _batch_probabilities(model, tokenizer, encoded: list[tuple[list[int], int]], token_ids: list[int]) -> list[list]:
    """One batch of (ids, response length): each example's probabilities at its response positions."""
    import torch  # here, not at the top: commands that only read finished runs never load torch

    keep = max(n for _, n in encoded) + 1
    # Left padding puts every response at the end, so only the last `keep` logits are needed.
    logits = padded_forward(model, [e[0] for e in encoded], tokenizer.pad_token_id, logits_to_keep=keep).logits
    probs = torch.softmax(logits[:, -keep:].float(), dim=-1)[..., torch.tensor(token_ids).to(logits.device)].cpu()
    # The last n+1 logits of each row: after the prompt's last token, then after each response token.
    return [probs[row, keep - n - 1 :].tolist() for row, (_, n) in enumerate(encoded)]


def mean_curve(per_example: list[list[float]], points: int = PROBE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """(grid, mean): the examples averaged at relative positions 0.0 .. 1.0 (linear interpolation within each)."""
    check_number(points, "--points", NUMERIC_RULES["points"])
    grid = np.linspace(0.0, 1.0, points)
    curves = []
    for values in per_example:
        xs = np.linspace(0.0, 1.0, len(values)) if len(values) > 1 else np.zeros(1)
        curves.append(np.interp(grid, xs, values) if len(values) > 1 else np.full(points, values[0]))
    return grid, np.mean(curves, axis=0)


def average_curve(per_example: list[list[float]], points: int = PROBE_POINTS) -> list[dict]:
    """Average the examples at relative positions 0.0 .. 1.0 (linear interpolation within each example)."""
    grid, mean = mean_curve(per_example, points)
    return [{"position_frac": round(float(f), 4), "refusal_prob": float(p)} for f, p in zip(grid, mean)]


def probe_rows(path: str, field: str | None = None, limit: int | None = None) -> tuple[list[tuple[str, str]], str]:
    """(prompt, response) pairs from a JSONL, JSON array or CSV file (the prompt by `data.sources.prompt_of`); the response field
    defaults to harmful_response, else response."""
    rows = read_records(path)
    if field is None:
        field = "harmful_response" if "harmful_response" in rows[0][1] else "response"
    pairs = []
    for lineno, row in rows[:limit] if limit else rows:
        if not isinstance(row.get(field), str):
            raise InputError(
                f"row needs a string field '{field}' (it has {columns(row)}; --field names another)", path, lineno
            )
        pairs.append((prompt_of(row, path, lineno), row[field]))
    return pairs, field


def probe(
    model,
    tokenizer,
    pairs: list[tuple[str, str]],
    refusal_phrase: str = REFUSAL_PHRASE,
    template: str = "auto",
    batch_size: int = 16,
    points: int = PROBE_POINTS,
    progress: bool = False,
    shard=None,
) -> dict:
    per_example = refusal_probabilities(model, tokenizer, pairs, refusal_phrase, template, batch_size, progress, shard)
    curve = average_curve(per_example, points)
    return {
        "n_examples": len(pairs),
        "refusal_phrase": refusal_phrase,
        "refusal_tokens": [tokenizer.decode([i]) for i in refusal_token_ids(tokenizer, refusal_phrase)],
        "mean_refusal_prob": float(np.mean([c["refusal_prob"] for c in curve])),
        "curve": curve,
        "per_example": [
            {"instruction": q, "refusal_probs": [round(p, 6) for p in probs]}
            for (q, _), probs in zip(pairs, per_example)
        ],
    }


def plot_curves(
    curves: dict[str, list[dict]], path: str | Path, title: str = "Refusal probability inside the response"
) -> None:
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
