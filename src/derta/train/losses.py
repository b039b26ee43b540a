"""The training loss: Σ w·NLL over labelled tokens / (number of labelled tokens), with its parts for logging.

The loss runs the decoder body once, keeps only the hidden states whose next token is labelled, and applies
the output projection + cross-entropy to those in chunks that are recomputed in backward, so no batch x length
x vocabulary tensor ever exists (`loss_impl: chunked`; `full` is the plain logits loss, kept for comparison).
RTO tokens carry their row's `loss_weight`; with a reference model, Qi et al.'s token-wise constraint weights
every token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from derta.data.tokenize import IGNORE

# Rows of hidden states per output-projection chunk: about 2**25 logits (128 MB in fp32) at a time.
LOGITS_PER_CHUNK = 2**25


def _causal_lm_parts(model):
    """(decoder body, output projection, CausalLM) of a model, through peft and DDP wrappers."""
    model = getattr(model, "module", model)  # DDP / DataParallel
    if hasattr(model, "get_base_model"):  # peft: LoRA layers are injected in place, so the base model has them
        model = model.get_base_model()
    return model.get_decoder(), model.get_output_embeddings(), model


def _chunk_nll(hidden, targets, head, softcap):
    """NLL and argmax of the logits of one chunk; called under checkpoint so the logits are not kept."""
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)


def labelled_hidden(model, inputs: dict, labels: torch.Tensor, trunk=None):
    """Decoder-body hidden states at the positions whose next-token label is not -100 (through `trunk`, a
    train.trunk.TrunkCache, when given).

    Returns (hidden (N, H), targets (N,), mask (B, T-1), output projection, final-logit softcap or None).
    """
    body, head, lm = _causal_lm_parts(model)
    hidden = trunk(body, inputs) if trunk is not None else body(**inputs, use_cache=False).last_hidden_state
    hidden = hidden[:, :-1]
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE)
    return hidden[mask], targets[mask], mask, head, getattr(lm.config, "final_logit_softcapping", None)


def chunked_nll(hidden, targets, head, softcap=None):
    """Per-token NLL and argmax, LOGITS_PER_CHUNK logits at a time, each chunk recomputed in backward."""
    rows = max(1, LOGITS_PER_CHUNK // head.weight.shape[0])
    parts = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start : start + rows], targets[start : start + rows]
        parts.append(
            checkpoint(_chunk_nll, h, t, head, softcap, use_reentrant=False)
            if torch.is_grad_enabled()
            else _chunk_nll(h, t, head, softcap)
        )
    if not parts:
        return hidden.new_zeros(0, dtype=torch.float32), targets.new_zeros(0)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _liger_function(hidden, head):
    """Liger-Kernel's fused linear cross-entropy when it applies (CUDA, liger-kernel installed: the `cuda` extra)."""
    if not hidden.is_cuda or head.bias is not None:
        return None
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def grouped_fused_loss(fused_ce, hidden, targets, head, token_weight, token_rto, softcap=None):
    """Σ w·NLL and the per-part sums from a fused linear cross-entropy `fused_ce(h, W, t, reduction="sum", softcap=)`.

    It is called once per (weight, kind) group, so per-token weights need no per-token output from
    the kernel. The kernel gives no argmax, so rto_accuracy is not logged on this path.
    """
    total, parts = hidden.new_zeros((), dtype=torch.float32), {"mle": [0.0, 0], "rto": [0.0, 0]}
    for w, rto in torch.unique(torch.stack([token_weight, token_rto.float()], 1), dim=0).tolist():
        group = token_weight.eq(w) & token_rto.eq(bool(rto))
        out = fused_ce(hidden[group], head.weight, targets[group], reduction="sum", softcap=softcap)
        nll_sum = (out[0] if isinstance(out, tuple) else out).float()
        total = total + w * nll_sum
        part = parts["rto" if rto else "mle"]
        part[0] += float(nll_sum.detach())
        part[1] += int(group.sum())
    return total, {k: tuple(v) for k, v in parts.items() if v[1]}


def full_logits_nll(model, inputs: dict, labels: torch.Tensor):
    """The plain loss: logits at every position, copied to fp32. Returns (nll, argmax, mask) at the labelled positions."""
    logits = model(**inputs).logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets.ne(IGNORE)
    nll = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view_as(targets)
    return nll[mask], logits.argmax(-1)[mask], mask


# Qi et al.'s per-position beta schedule, as multiples of --constraint-beta (their code's defaults: beta 0.1,
# first_token_bias_factor 5, bias_factor 20, bias_length 5): 0.5 on a row's first trained token, 2 on tokens 2-5,
# 0.1 after.
CONSTRAINT_FIRST, CONSTRAINT_EARLY, CONSTRAINT_EARLY_TOKENS = 5.0, 20.0, 5


def constraint_betas(rank: torch.Tensor, beta: float) -> torch.Tensor:
    """beta_t of each trained token from its rank among its row's trained tokens (0 = the first)."""
    scale = torch.where(rank == 0, CONSTRAINT_FIRST, torch.where(rank < CONSTRAINT_EARLY_TOKENS, CONSTRAINT_EARLY, 1.0))
    return beta * scale


def constraint_weights(nll: torch.Tensor, ref_nll: torch.Tensor, betas: torch.Tensor) -> torch.Tensor:
    """Per-token weights that turn cross-entropy into Qi et al.'s token-wise constrained objective.

    Their objective is sum_t (2/beta_t) softplus(-beta_t d_t), d_t = log p(y_t) - log p_ref(y_t); its gradient
    is 2 sigmoid(-beta_t d_t) times cross-entropy's. As in their code the weight is detached and clamped at
    1e-3, so weight x NLL has that gradient, equals NLL at beta = 0, and grows as the model falls below the
    reference (d_t < 0: up to 2x) and fades where it is already above it.
    """
    return (2 * torch.sigmoid(-betas * (ref_nll - nll).detach())).clamp(min=1e-3)


def _ranks_in_row(inputs: dict, mask: torch.Tensor) -> torch.Tensor:
    """For each labelled target (in `mask`'s row-major order): how many trained tokens of its row come before it."""
    if "position_ids" in inputs:  # packed: a row starts where position_ids go back to 0
        row = (inputs["position_ids"] == 0).cumsum(-1)[:, 1:]
    else:
        row = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)
    row = row[mask]
    index = torch.arange(row.numel(), device=row.device)
    first = torch.ones_like(row, dtype=torch.bool)
    first[1:] = row[1:] != row[:-1]
    return index - torch.cummax(torch.where(first, index, 0), 0).values


def _reference_nll(reference, inputs: dict, labels: torch.Tensor, loss_impl: str) -> torch.Tensor:
    """The reference model's NLL of every labelled target (no gradient)."""
    with torch.no_grad():
        if loss_impl == "full":
            return full_logits_nll(reference, inputs, labels)[0]
        hidden, targets, _, head, softcap = labelled_hidden(reference, inputs, labels)
        return chunked_nll(hidden, targets, head, softcap)[0]


def _as_wrapped_forward(wrapper, compute):
    """Call `wrapper()` with its inner module's forward temporarily replaced by `compute`."""
    inner = wrapper.module
    own = vars(inner).get("forward")  # accelerate may have set an instance forward (autocast); keep it
    inner.forward = lambda *args, **kwargs: compute()
    try:
        return wrapper()
    finally:
        if own is None:
            del inner.forward
        else:
            inner.forward = own


def batch_loss(
    model,
    inputs: dict,
    loss_impl: str = "chunked",
    num_items_in_batch=None,
    reference=None,
    constraint_beta: float = 0.1,
    trunk=None,
) -> tuple[torch.Tensor, dict]:
    """Σ w·NLL over labelled tokens / (number of labelled tokens), and the per-part sums for logging.

    `inputs` is a collator batch (padded or packed); it is not modified. With a `reference` model each
    token's NLL is also weighted by Qi et al.'s constraint (`constraint_weights`, beta from `constraint_betas`).
    `trunk` (train.trunk.TrunkCache, unwrapped models only) reuses the frozen layers' states of rows seen before.
    """
    if loss_impl != "full" and isinstance(model, torch.nn.DataParallel):
        loss_impl = "full"  # its replicas run only inside its own forward: nothing to gather hidden states from
    elif loss_impl != "full" and hasattr(model, "module"):
        # DDP, FSDP and DeepSpeed do their work (gradient sync, parameter gathering) in their own forward:
        # compute the loss as the wrapped module's forward, through the wrapper.
        return _as_wrapped_forward(
            model, lambda: batch_loss(model.module, inputs, loss_impl, num_items_in_batch, reference, constraint_beta)
        )
    inputs = dict(inputs)
    labels, weight, is_rto = inputs.pop("labels"), inputs.pop("loss_weight"), inputs.pop("is_rto")
    if weight.dim() == 1:  # padded batches carry one value per row, packed ones one per token
        weight, is_rto = weight[:, None].expand_as(labels), is_rto[:, None].expand_as(labels)
    if loss_impl == "full":
        nll, argmax, mask = full_logits_nll(model, inputs, labels)
    else:
        hidden, targets, mask, head, softcap = labelled_hidden(model, inputs, labels, trunk)
    # The label at t+1 is predicted at t: a target's weight and kind are those of its own token.
    token_weight = weight[:, 1:][mask].float()
    token_rto = is_rto[:, 1:][mask]
    denom = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp(min=1)
    if loss_impl != "full":
        fused_ce = _liger_function(hidden, head) if reference is None else None  # the constraint needs per-token NLL
        if fused_ce is not None and hidden.shape[0]:
            loss, parts = grouped_fused_loss(fused_ce, hidden, targets, head, token_weight, token_rto, softcap)
            return loss / denom, parts
        nll, argmax = chunked_nll(hidden, targets, head, softcap)
    parts = {}
    if reference is not None:
        betas = constraint_betas(_ranks_in_row(inputs, mask), constraint_beta)
        constraint = constraint_weights(nll, _reference_nll(reference, inputs, labels, loss_impl), betas)
        token_weight = token_weight * constraint
        parts["constraint"] = (float(constraint.sum()), int(constraint.numel()))
    loss = (nll * token_weight).sum() / denom
    with torch.no_grad():
        for name, m in (("mle", ~token_rto), ("rto", token_rto)):
            parts[name] = (float(nll[m].sum()), int(m.sum()))
        if argmax is not None and token_rto.any():
            parts["rto_hit"] = (float((argmax.eq(labels[:, 1:][mask]) & token_rto).sum()), int(token_rto.sum()))
    return loss, parts
