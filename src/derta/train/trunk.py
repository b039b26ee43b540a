"""The frozen trunk's hidden states, computed once per row and reused (`trunk_cache_gb`).

When only the top layers train (`--lora-layers N`, or every weight below a layer frozen), the layers below see
the same rows every epoch and have no gradient: their output for a row is a function of the row's tokens alone
(packing keeps rows apart through position_ids; RTO's re-drawn positions change labels, not inputs). The first
time a row is seen, the input of the lowest trained layer is kept for it (keyed by its token ids); a batch whose
rows are all kept runs only the trained layers, from those states. A batch with any row not kept runs the whole
model (and keeps what the budget allows).

The cache turns itself off, saying why, when the trunk is not frozen (an embedding row or a lower layer trains:
`--refusal-tokens` train their new embedding rows), when a frozen layer drops out at random, on more than one
process, and when the trained layers run from the kept states give other outputs than the whole model on the
first batch (checked once: a model whose forward treats `inputs_embeds` differently from its embeddings' output).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

# The whole model's and the top layers' outputs from the same states must agree within this (relative, max-abs).
CHECK_TOLERANCE = 1e-3


def trunk_start(model) -> tuple[int | None, str]:
    """(index of the lowest decoder layer with a trained weight, "") when the layers below it and the embeddings
    are frozen and deterministic; else (None, why not)."""
    from derta.train.losses import _causal_lm_parts

    body = _causal_lm_parts(model)[0]
    layers = getattr(body, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        return None, "the decoder has no list of layers"
    trained = [i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())]
    if not trained:
        return None, "no decoder layer trains"
    start = trained[0]
    if start == 0:
        return None, "the lowest decoder layer trains"
    below = [body.get_input_embeddings(), *layers[:start]]
    if any(p.requires_grad for m in below for p in m.parameters()):
        return None, "an embedding row or a layer below the trained ones trains"
    if getattr(body.config, "attention_dropout", 0.0) or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for layer in layers[:start] for m in layer.modules()
    ):
        return None, "the frozen layers drop out at random"
    return start, ""


@contextmanager
def _top_layers_only(body, start: int):
    """The decoder runs only layers[start:] (and, for models that look up per-layer settings by index, their
    settings), restored afterwards."""
    layers, config = body.layers, body.config
    types = getattr(config, "layer_types", None)
    body.layers = torch.nn.ModuleList(list(layers)[start:])
    if isinstance(types, list):
        config.layer_types = types[start:]
    try:
        yield
    finally:
        body.layers = layers
        if isinstance(types, list):
            config.layer_types = types


class TrunkCache:
    """Call it with a decoder body and a collator batch (without labels) for the body's last hidden state."""

    def __init__(self, start: int, budget_bytes: int):
        self.start, self.budget = start, int(budget_bytes)
        self.states: dict[bytes, torch.Tensor] = {}
        self.bytes = 0
        self.checked = False
        self.off = ""  # why the cache stopped (empty while it works)
        self.batches = {"cached": 0, "computed": 0}

    def summary(self) -> dict:
        return {
            "used": not self.off and self.batches["cached"] > 0,
            "start_layer": self.start,
            "rows_kept": len(self.states),
            "megabytes": round(self.bytes / 2**20, 1),
            "budget_megabytes": round(self.budget / 2**20, 1),
            "batches": dict(self.batches),
            **({"off": self.off} if self.off else {}),
        }

    @staticmethod
    def _spans(inputs: dict) -> list[tuple[int, int, int]] | None:
        """(batch row, start, end) of each training row in the batch; None when rows cannot be told apart."""
        ids = inputs["input_ids"]
        if "position_ids" in inputs and ids.shape[0] == 1:  # packed: a row starts where position_ids go back to 0
            pos = inputs["position_ids"][0]
            if int(pos[0]) != 0:
                return None
            starts = (pos == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            return [(0, a, b) for a, b in zip(starts, starts[1:])]
        mask = inputs.get("attention_mask")
        if mask is None:
            return [(i, 0, ids.shape[1]) for i in range(ids.shape[0])]
        lengths = mask.sum(-1).tolist()
        if any(not bool(mask[i, :n].all()) for i, n in enumerate(lengths)):
            return None  # not right-padded
        return [(i, 0, int(n)) for i, n in enumerate(lengths)]

    def __call__(self, body, inputs: dict) -> torch.Tensor:
        spans = None if self.off else self._spans(inputs)
        if spans is None:
            return body(**inputs, use_cache=False).last_hidden_state
        ids = inputs["input_ids"].detach().cpu()
        keys = [ids[b, a:e].numpy().tobytes() for b, a, e in spans]
        if self.checked and all(k in self.states for k in keys):
            self.batches["cached"] += 1
            return self._top(body, inputs, self._assemble(inputs, spans, keys, self.states))
        self.batches["computed"] += 1
        captured = []

        def grab(module, args, kwargs):
            captured.append((args[0] if args else kwargs["hidden_states"]).detach())

        hook = body.layers[self.start].register_forward_pre_hook(grab, with_kwargs=True)
        try:
            out = body(**inputs, use_cache=False).last_hidden_state
        finally:
            hook.remove()
        rows = {key: captured[0][b, a:e] for (b, a, e), key in zip(spans, keys)}
        if not self.checked and not self._check(body, inputs, spans, keys, rows, out):
            return out
        for key, state in rows.items():
            size = state.numel() * state.element_size()
            if key not in self.states and self.bytes + size <= self.budget:
                self.states[key] = state.clone()
                self.bytes += size
        return out

    @staticmethod
    def _assemble(inputs: dict, spans, keys, states: dict) -> torch.Tensor:
        ids = inputs["input_ids"]
        first = states[keys[0]]
        batch = first.new_zeros(*ids.shape, first.shape[-1])
        for (b, a, e), key in zip(spans, keys):
            batch[b, a:e] = states[key]
        return batch

    def _top(self, body, inputs: dict, states: torch.Tensor) -> torch.Tensor:
        rest = {k: v for k, v in inputs.items() if k != "input_ids"}
        with _top_layers_only(body, self.start):
            return body(inputs_embeds=states, **rest, use_cache=False).last_hidden_state

    def _check(self, body, inputs: dict, spans, keys, rows: dict, whole: torch.Tensor) -> bool:
        """Once: the top layers from the rows' states must give the whole model's output at every real token."""
        self.checked = True
        with torch.no_grad():
            top = self._top(body, inputs, self._assemble(inputs, spans, keys, rows))
        real = torch.zeros(whole.shape[:2], dtype=torch.bool, device=whole.device)
        for b, a, e in spans:
            real[b, a:e] = True
        diff = (top[real].float() - whole.detach()[real].float()).abs().max()
        scale = whole.detach()[real].float().abs().max().clamp(min=1e-6)
        if not bool(diff <= CHECK_TOLERANCE * scale):
            self.off = f"the top layers from kept states differ from the whole model (max {float(diff / scale):.1e})"
        return not self.off
