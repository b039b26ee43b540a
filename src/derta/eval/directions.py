"""Where a model represents harm and refusal: two directions in its hidden states, per layer.

The harmfulness direction is read at the instruction's last token, the refusal direction at the post-instruction
tokens (what the chat template writes after the user's text, up to where the assistant's response starts, averaged):
at each, the mean hidden state over harmful prompts minus the mean over harmless ones ("LLMs Encode Harmfulness and
Refusal Separately", 2025). A logistic-regression probe on the same features is the alternative. A stratified
held-out split picks each direction's layer by accuracy: harmful when the projection passes the midpoint of the two
training means.

A score along a sequence (`position_scores`, used by `derta probe --directions`) is the projection rescaled so that
the harmless training mean is 0 and the harmful one is 1, which puts models on one axis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from derta.inference.base import over_context, padded_forward
from derta.io import InputError, atomic_open, read_text, show_progress, write_json
from derta.models.templates import encode_prompt, encode_text, format_prompt, resolve_template

KINDS = ("harmfulness", "refusal")  # read at the instruction's last token / at the post-instruction tokens
HELDOUT_SHARE = 0.3  # of each class, held out to pick the layer
PROBE_L2 = 1e-2  # the logistic probe's weight penalty (features standardised first)
TENSORS = "directions.safetensors"
INFO = "directions.json"


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def prompt_positions(tokenizer, instruction: str, template: str) -> tuple[list[int], int, int]:
    """(prompt ids, start, end): ids[start:end] are the instruction's tokens, ids[end:] the post-instruction ones
    (what the format writes after the user's text); ids[:start] is the format's opening (BOS, a system prompt)."""
    text = format_prompt(tokenizer, instruction, template)
    ids = encode_prompt(tokenizer, text, template)
    needle = instruction if instruction in text else instruction.strip()
    if not needle or needle not in text:
        raise InputError(f"the prompt format (--template {template}) does not hold the instruction verbatim")
    at = text.rindex(needle)
    start = _common_prefix(encode_prompt(tokenizer, text[:at], template), ids) if at else 0
    end = _common_prefix(encode_prompt(tokenizer, text[: at + len(needle)], template), ids)
    if end == 0 or end == len(ids):
        raise InputError(
            f"--template {template} writes no tokens after the instruction, so there is no refusal position; "
            "use a chat template or the inst format"
        )
    return ids, min(start, end - 1), end


def hidden_states(model, tokenizer, seqs: list[list[int]], batch_size: int = 16, progress: bool = False):
    """Yield (index, hidden states [layers, len, d]) of each sequence, unpadded: the output of every block (the
    embeddings left out), float32 on the CPU. Batches of similar lengths, left padded."""
    import torch  # here, not at the top: commands that only read finished runs never load torch

    over_context(model, [len(s) for s in seqs], "sequences")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="hidden states", disable=not show_progress(progress)):
            batch = order[start : start + batch_size]
            out = padded_forward(
                model, [seqs[i] for i in batch], tokenizer.pad_token_id, output_hidden_states=True, logits_to_keep=1
            )
            hs = torch.stack(out.hidden_states[1:], 1).float().cpu()  # [batch, layers, width, d]
            for row, i in enumerate(batch):
                yield i, hs[row, :, hs.shape[2] - len(seqs[i]) :]
    finally:
        if was_training:
            model.train()


def prompt_features(model, tokenizer, prompts: list[str], template: str = "auto", batch_size: int = 16, progress=False):
    """{kind: array [prompts, layers, d]}: the hidden state at the instruction's last token, and the mean over the
    post-instruction tokens."""
    template = resolve_template(tokenizer, template)
    encoded = [prompt_positions(tokenizer, p, template) for p in prompts]
    feats: dict[str, list] = {k: [None] * len(prompts) for k in KINDS}
    for i, h in hidden_states(model, tokenizer, [ids for ids, _, _ in encoded], batch_size, progress):
        n = encoded[i][2]
        feats["harmfulness"][i] = h[:, n - 1].numpy()
        feats["refusal"][i] = h[:, n:].mean(1).numpy()
    return {k: np.stack(v) for k, v in feats.items()}


def split(n_harmful: int, n_harmless: int, heldout: float = HELDOUT_SHARE, seed: int = 0):
    """(train, held out) index arrays over harmful-then-harmless rows, stratified: each class keeps at least one
    row on each side."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for offset, n in ((0, n_harmful), (n_harmful, n_harmless)):
        if n < 2:
            raise InputError("each of --harmful and --harmless needs at least 2 prompts (one to fit, one to hold out)")
        k = min(n - 1, max(1, round(n * heldout)))
        order = offset + rng.permutation(n)
        test += order[:k].tolist()
        train += order[k:].tolist()
    return np.array(sorted(train)), np.array(sorted(test))


def auroc(positive, negative) -> float:
    """P(score of a random positive > score of a random negative), ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, float)[:, None], np.asarray(negative, float)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def logistic_probe(x, y, seed: int = 0, steps: int = 100):
    """Per layer, an L2-penalised logistic regression of y on x [rows, layers, d] (standardised features, full-batch
    L-BFGS, all layers at once since their losses add up): (weights [layers, d], bias [layers]) in x's units."""
    import torch

    torch.manual_seed(seed)
    xt = torch.tensor(x, dtype=torch.float64).transpose(0, 1)  # [layers, rows, d]
    mean, std = xt.mean(1, keepdim=True), xt.std(1, keepdim=True).clamp(min=1e-6)
    z, yt = (xt - mean) / std, torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(z.shape[0], z.shape[2], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(z.shape[0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def loss():
        opt.zero_grad()
        logits = torch.einsum("lnd,ld->ln", z, w) + b[:, None]
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt.expand_as(logits), reduction="none")
        value = value.mean(1).sum() + PROBE_L2 * (w**2).sum()
        value.backward()
        return value

    opt.step(loss)
    weight = (w / std[:, 0]).detach()
    bias = (b - (weight * mean[:, 0]).sum(1)).detach()
    return weight.numpy(), bias.numpy()


def fit_kind(x, y, train, test, seed: int = 0) -> tuple[dict, list[dict]]:
    """One kind's directions: (arrays, per-layer held-out rows) from features x [rows, layers, d] and labels y."""
    harm, safe = train[y[train] == 1], train[y[train] == 0]
    diff = x[harm].mean(0) - x[safe].mean(0)
    unit = diff / np.clip(np.linalg.norm(diff, axis=1, keepdims=True), 1e-12, None)
    proj = np.einsum("nld,ld->nl", x, unit)
    hi, lo = proj[harm].mean(0), proj[safe].mean(0)
    weight, bias = logistic_probe(x[train], y[train].astype(float), seed)
    logits = np.einsum("nld,ld->nl", x, weight) + bias
    rows = []
    for layer in range(x.shape[1]):
        t = test
        rows.append(
            {
                "layer": layer + 1,
                "accuracy": float(((proj[t, layer] > (hi[layer] + lo[layer]) / 2) == (y[t] == 1)).mean()),
                "auroc": auroc(proj[t[y[t] == 1], layer], proj[t[y[t] == 0], layer]),
                "probe_accuracy": float(((logits[t, layer] > 0) == (y[t] == 1)).mean()),
                "separation": float(hi[layer] - lo[layer]),
            }
        )
    arrays = {"direction": unit, "harmful_mean": hi, "harmless_mean": lo, "probe_weight": weight, "probe_bias": bias}
    return arrays, rows


def choose_layer(rows: list[dict]) -> int:
    """The layer of the best held-out accuracy; ties go to the better held-out AUROC, then the earlier layer."""
    return min(rows, key=lambda r: (-r["accuracy"], -r["auroc"], r["layer"]))["layer"]


def fit_directions(features: dict, n_harmful: int, n_harmless: int, heldout: float, seed: int) -> tuple[dict, dict]:
    """(tensors as numpy arrays named "KIND.NAME", summary with per-layer rows and the chosen layers); layers are
    counted from 1, the first block's output (tensors hold them from index 0)."""
    y = np.array([1] * n_harmful + [0] * n_harmless)
    train, test = split(n_harmful, n_harmless, heldout, seed)
    tensors, layers, chosen = {}, {}, {}
    for kind in KINDS:
        arrays, rows = fit_kind(features[kind], y, train, test, seed)
        tensors.update({f"{kind}.{k}": np.asarray(v, np.float32) for k, v in arrays.items()})
        layers[kind], chosen[kind] = rows, choose_layer(rows)
    cosine = np.einsum("ld,ld->l", tensors["harmfulness.direction"], tensors["refusal.direction"])
    summary = {
        "n_train": len(train),
        "n_heldout": len(test),
        "chosen_layer": chosen,
        "heldout": {k: layers[k][chosen[k] - 1] for k in KINDS},
        "cosine_harmfulness_refusal": [round(float(c), 4) for c in cosine],
        "layers": layers,
    }
    return tensors, summary


def save_directions(out: str | Path, tensors: dict, info: dict) -> None:
    import torch
    from safetensors.torch import save

    data = save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()})
    with atomic_open(Path(out) / TENSORS, "wb", encoding=None) as f:
        f.write(data)
    write_json(Path(out) / INFO, info)


def load_directions(path: str | Path) -> tuple[dict, dict]:
    """(numpy arrays by name, directions.json) of a `derta directions` output directory."""
    from safetensors.numpy import load

    from derta.io import loads
    from derta.models.loading import safetensors_problem

    path = Path(path)
    tensors_path, info_path = path / TENSORS, path / INFO
    for p in (tensors_path, info_path):
        if not p.is_file():
            raise InputError(f"--directions: no {p.name} here (the output directory of `derta directions`)", path)
    problem = safetensors_problem(tensors_path)
    if problem:
        raise InputError(f"--directions: {problem}", tensors_path)
    info = loads(read_text(info_path), info_path)
    if not isinstance(info, dict) or set(info.get("chosen_layer", {})) != set(KINDS):
        raise InputError("not a directions.json written by `derta directions`", info_path)
    tensors = load(tensors_path.read_bytes())
    missing = [f"{k}.direction" for k in KINDS if f"{k}.direction" not in tensors]
    if missing:
        raise InputError(f"--directions: {TENSORS} lacks {', '.join(missing)}", tensors_path)
    return tensors, info


def scorer(tensors: dict, info: dict, kind: str, layer: int | None = None):
    """(layer, a function of hidden states [..., layers, d] -> scores [...]): the projection on the kind's direction
    at its chosen layer (counted from 1), rescaled so the harmless training mean is 0 and the harmful one 1."""
    layer = (info["chosen_layer"][kind] if layer is None else layer) - 1
    unit = tensors[f"{kind}.direction"][layer]
    lo, hi = float(tensors[f"{kind}.harmless_mean"][layer]), float(tensors[f"{kind}.harmful_mean"][layer])
    scale = hi - lo if abs(hi - lo) > 1e-12 else 1.0
    return layer + 1, lambda h: (np.asarray(h)[..., layer, :] @ unit - lo) / scale


def check_fits(model, tensors: dict) -> None:
    """Directions from a model of another shape (layers, hidden size) are one line, not an index error."""
    layers, width = tensors["refusal.direction"].shape
    have = (getattr(model.config, "num_hidden_layers", layers), getattr(model.config, "hidden_size", width))
    if have != (layers, width):
        raise InputError(
            f"--directions: made for {layers} layers of width {width}, the model has {have[0]} of width {have[1]}"
        )


def position_scores(model, tokenizer, pairs, tensors, info, template="auto", batch_size=16, progress=False):
    """For each (instruction, response), teacher forced: both scores ("harmfulness", "refusal") at every position
    from the instruction's first token to the response's last, "prompt_tokens" of them in the prompt, and the refusal
    cliff: the highest refusal score minus the one at the last position. The format's opening (BOS, a default system
    prompt; "format_tokens_before" tokens) is left out: it is the same for every request, and a BOS hidden state's
    outlying norm would otherwise set the maximum."""
    template = resolve_template(tokenizer, template)
    check_fits(model, tensors)
    seqs = []
    for instruction, response in pairs:
        prompt, start, _ = prompt_positions(tokenizer, instruction, template)
        seqs.append((start, len(prompt), prompt + encode_text(tokenizer, response)))
    score = {k: scorer(tensors, info, k)[1] for k in KINDS}
    out: list = [None] * len(pairs)
    for i, h in hidden_states(model, tokenizer, [s for _, _, s in seqs], batch_size, progress):
        start, n_prompt, _ = seqs[i]
        per_token = h[:, start:].transpose(0, 1).numpy()  # [positions from the instruction on, layers, d]
        row = {"prompt_tokens": n_prompt - start, "format_tokens_before": start}
        row.update({k: [round(float(v), 5) for v in score[k](per_token)] for k in KINDS})
        row["cliff"] = round(max(row["refusal"]) - row["refusal"][-1], 5)
        out[i] = row
    return out
