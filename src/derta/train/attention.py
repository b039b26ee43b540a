"""Attention over packed rows at the rows' own cost (`row_attention`).

A packed batch is one sequence whose position_ids restart at every row (train.collators.PackCollator).
transformers' sdpa runs it as one attention over all L positions under a block-diagonal mask: the kernel scores
all L² pairs however short the rows are (the bench's DeRTa-like batches on SmolLM2: 8 rows, 660-790 packed tokens,
5.6-6.5x the pairs the rows have), and the L x L mask is built again at every forward. Here the same kernel runs
once per row with its causal flag: Σ n² pairs, no mask. Any other batch (padding, a KV cache, several sequences)
goes to transformers' sdpa unchanged, so a model switched to it still generates and evaluates as before.

The result is the masked attention's up to float rounding (tested against it, loss and gradients). The switch
lives in the loaded model object only: a saved config.json does not record the attention implementation.
"""

from __future__ import annotations

import torch

NAME = "derta_rows"


def row_bounds(position_ids: torch.Tensor) -> list[int]:
    """[0, start of row 2, ..., L] for one packed sequence's position_ids (each row starts at position 0)."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return [*starts, position_ids.numel()]


def _row_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    packed_once = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2] == position_ids.shape[-1]
    )
    if not packed_once:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    bounds = row_bounds(position_ids.reshape(-1))
    gqa = query.shape[1] != key.shape[1]
    rows = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            dropout_p=dropout,
            scale=scaling,
            is_causal=True,
            enable_gqa=gqa,
        )
        for a, b in zip(bounds, bounds[1:])
    ]
    out = rows[0] if len(rows) == 1 else torch.cat(rows, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _row_mask(**kwargs):
    """No mask for an unpadded batch (the rows' causal flags are the mask); sdpa's own mask for a padded one
    (transformers calls a mask interface with keywords only)."""
    from transformers.masking_utils import sdpa_mask

    padding = kwargs.get("attention_mask")
    if padding is None or (padding.shape[1] == kwargs["kv_length"] and bool(padding.all())):
        return None
    return sdpa_mask(**kwargs)


def use_row_attention(model) -> bool:
    """Switch a model that attends with sdpa to per-row attention for packed batches; whether it did (eager and
    the flash kernels have packed paths of their own and are left alone)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(NAME, _row_sdpa)
    AttentionMaskInterface.register(NAME, _row_mask)
    model.set_attn_implementation(NAME)
    return True
