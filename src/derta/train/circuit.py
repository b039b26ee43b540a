"""Circuit Breakers (Zou et al., 2024, "Improving Alignment and Robustness with Circuit Breakers"): a LoRA adapter
trained so that the hidden states of harmful responses are rerouted away from the frozen model's, while the
hidden states of everything else stay where they were. No cross-entropy: the two losses below are the objective.

    rerouting  ReLU(cos(h_θ, h_frozen)), averaged over the harmful-response tokens of `reroute` rows at the
               `cb_layers` (pushed to orthogonal or beyond; below zero nothing is left to push); with
               `cb_skip_massive` k > 0 the cosine leaves out the massive dimensions (below)
    retain     ‖h_θ − h_frozen‖₂, averaged over every token of the other rows (helpful and refusal) at every layer
    loss       c_rr(t) · rerouting + c_retain(t) · retain, c_rr = α(1 − t/2T), c_retain = α·t/2T (their Algorithm 1);
               with `cb_warmup_steps` W, c_retain = 0 for t < W (below)

Massive activations (Sun et al., 2024): a few hidden dimensions, the same ones at almost every token, many times
larger than the rest. In SmolLM2-135M at layers 9 and 19, three of 576 dimensions carry 43-47 % of a typical
token's squared norm, so any two tokens' states have cosine ~0.6 and turning one orthogonal means cancelling those
dimensions, which every other token keeps. With `cb_skip_massive` k, the cosine is taken over the dimensions whose
RMS over the batch's rerouted frozen states is at most k times the median dimension's; there two tokens' states
have cosine ~0.1, as in models without them (docs/baselines.md: what it does and does not fix on SmolLM2).

At the frozen states ReLU(cos) is at its maximum: its gradient grows with the distance δ as δ/|h|², while the
retain loss has a gradient of length one at any distance. Where |h| is large (SmolLM2: 125-200 at the rerouted
layers) the retain term outweighs the rerouting by 10^5 from the first step in which it has any weight, and the
states never leave. `cb_warmup_steps` W trains the rerouting alone for W steps, so it can leave the maximum before
the retain loss holds the benign states in place; 0 is the paper's schedule.

h_frozen comes from the same model with its adapter switched off (peft's `disable_adapter`), so the frozen
model costs a forward pass without gradient, never a second copy of the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer

from derta.data.tokenize import IGNORE
from derta.io import InputError
from derta.models.precision import cpu_autocast
from derta.train.losses import _causal_lm_parts
from derta.train.trainer import CompleteCheckpoints, uses_cpu_bf16

# `cb_layers: auto`: the depths of Zou et al.'s Llama-3-8B run (layers 10 and 20 of 32), on any model.
AUTO_DEPTHS = (10 / 32, 20 / 32)
# With LoRA's B at zero the adapted states equal the frozen ones, where ReLU(cos) is at its maximum and has no
# gradient: in float32 the rerouting never started (the tiny model: cos 1.0000 after 400 steps). B starts at small
# random values instead, so the states start just off the frozen ones. (On SmolLM2 that is not enough: the retain
# loss holds them there unless `cb_warmup_steps` leaves it out at first; docs/baselines.md.)
LORA_B_INIT_STD = 1e-3


def parse_cb_layers(spec: str, num_layers: int) -> list[int]:
    """The layers whose outputs are rerouted (1 = the first decoder layer's output, as in `hidden_states[l]`):
    "auto" is the paper's depths; "top:N" the same depths within the top N layers (where a model tuned on its top N
    layers differs from its base); else comma-separated numbers."""
    top = f"top:{num_layers}" if spec.strip() == "auto" else spec.strip()
    if top.startswith("top:"):
        n = top[4:]
        if not n.isdigit() or not 1 <= int(n) <= num_layers:
            raise InputError(f"--cb-layers '{spec}': top:N needs N from 1 to the model's {num_layers} layers")
        return sorted({num_layers - int(n) + max(1, round(d * int(n))) for d in AUTO_DEPTHS})
    try:
        layers = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise InputError(f"--cb-layers '{spec}': use comma-separated layer numbers, auto or top:N") from None
    if not layers or not all(1 <= x <= num_layers for x in layers):
        raise InputError(f"--cb-layers '{spec}': layers are numbered 1 to the model's {num_layers}")
    return layers


def cb_coefficients(step: int, total: int, alpha: float, warmup: int = 0) -> tuple[float, float]:
    """(c_rr, c_retain) at optimizer step `step` of `total`: α(1 − t/2T) falling to α/2, α·t/2T rising to α/2;
    c_retain is 0 for the first `warmup` steps (the rerouting alone)."""
    progress = min(max(step, 0), total) / (2 * max(total, 1))
    return alpha * (1 - progress), (alpha * progress if step >= warmup else 0.0)


def massive_dims(frozen: torch.Tensor, factor: float) -> torch.Tensor:
    """(layers, H) True where a dimension's RMS over the (layers, N, H) states exceeds `factor` x the median's."""
    rms = frozen.pow(2).mean(1).sqrt()
    return rms > factor * rms.median(-1, keepdim=True).values


def rerouting_loss(
    live: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor, skip_massive: float = 0.0
) -> tuple[torch.Tensor, float]:
    """Mean ReLU(cosine) between (layers, B, T, H) states at the `mask` (B, T) positions, and the mean cosine; with
    `skip_massive` k > 0 the cosine leaves out the dimensions `massive_dims(frozen, k)` finds."""
    live, frozen = live.float()[:, mask], frozen.float()[:, mask]  # (layers, N, H)
    if skip_massive > 0 and frozen.shape[1]:
        keep = ~massive_dims(frozen, skip_massive)[:, None]
        live, frozen = live * keep, frozen * keep
    cos = F.cosine_similarity(live, frozen, dim=-1)  # (layers, N)
    n = max(cos.numel(), 1)
    return torch.relu(cos).sum() / n, float(cos.detach().sum()) / n


def retain_loss(live: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance between (layers, B, T, H) states at the `mask` (B, T) positions."""
    dist = (live.float() - frozen.float()).norm(dim=-1)[:, mask]
    return dist.sum() / max(dist.numel(), 1)


def all_hidden_states(model, inputs: dict) -> torch.Tensor:
    """Every layer's output (layers, B, T, H) from the decoder body (no output projection: no logits)."""
    body = _causal_lm_parts(model)[0]
    return torch.stack(body(**inputs, output_hidden_states=True, use_cache=False).hidden_states[1:])


class CircuitBreakerTrainer(CompleteCheckpoints, Trainer):
    """Trainer whose loss is the circuit-breaker objective (module doc) on `reroute` rows and the retained rest."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        peft_model = getattr(self.model, "module", self.model)
        if not hasattr(peft_model, "disable_adapter"):
            raise InputError("circuit-breakers rows train a LoRA adapter: add --lora (the frozen model is the base)")
        total = peft_model.config.num_hidden_layers
        self.cb_layers = parse_cb_layers(self.args.cb_layers, total)
        lowest = total - self.args.lora_layers if self.args.lora_layers else 0  # adapted layers: lowest+1 .. total
        if self.cb_layers[0] <= lowest:
            raise InputError(
                f"--cb-layers: layer {self.cb_layers[0]}'s states cannot move, LoRA adapts only layers {lowest + 1} to "
                f"{total} (--lora-layers {self.args.lora_layers}); reroute higher layers or adapt more"
            )
        generator = torch.Generator().manual_seed(self.args.seed)
        with torch.no_grad():
            for name, weight in peft_model.named_parameters():
                if "lora_B" in name:
                    weight.copy_(torch.randn(weight.shape, generator=generator) * LORA_B_INIT_STD)
        self.cpu_bf16 = uses_cpu_bf16(self.args)
        # The loss is a mean per micro-batch: Trainer divides it by the accumulation steps itself.
        self.model_accepts_loss_kwargs = False
        self._parts = {"reroute_loss": [0.0, 0], "retain_loss": [0.0, 0], "reroute_cos": [0.0, 0]}

    def _coefficients(self) -> tuple[float, float]:
        args = self.args
        return cb_coefficients(self.state.global_step, self.state.max_steps, args.cb_alpha, args.cb_warmup_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels, reroute = inputs.pop("labels"), inputs.pop("is_reroute")
        for key in ("loss_weight", "is_rto"):
            inputs.pop(key, None)
        if reroute.dim() == 1:  # padded batches carry one flag per row, packed ones one per token
            reroute = reroute[:, None].expand_as(labels)
        present = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(reroute)
        reroute_mask, retain_mask = reroute & labels.ne(IGNORE), ~reroute & present
        c_rr, c_retain = self._coefficients()
        peft_model = getattr(model, "module", model)
        # As DertaTrainer: the decoder body is called past accelerate's wrapper, so both autocasts are entered here.
        with self.accelerator.autocast(), cpu_autocast(self.cpu_bf16):
            with torch.no_grad(), peft_model.disable_adapter():
                frozen = all_hidden_states(peft_model, inputs)
            live = all_hidden_states(model, inputs)
        picked = [k - 1 for k in self.cb_layers]
        rr, cos = rerouting_loss(live[picked], frozen[picked], reroute_mask, self.args.cb_skip_massive)
        keep = retain_loss(live, frozen, retain_mask)
        loss = c_rr * rr + c_retain * keep
        if not torch.isfinite(loss.detach()):
            raise InputError(
                f"training stopped at step {self.state.global_step + 1}: the circuit-breaker loss is {loss.item()}; "
                "lower the learning rate or --cb-alpha"
            )
        n_rr, n_keep = int(reroute_mask.sum()), int(retain_mask.sum())
        for name, value, count in (
            ("reroute_loss", rr, n_rr),
            ("retain_loss", keep, n_keep),
            ("reroute_cos", cos, n_rr),
        ):
            if count:
                self._parts[name][0] += float(value.detach() if torch.is_tensor(value) else value) * count
                self._parts[name][1] += count
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict, start_time=None) -> None:
        # Token-weighted averages since the last log, and the schedule's weights at this step.
        if "loss" in logs:
            for name, (total, count) in self._parts.items():
                if count:
                    logs[name] = round(total / count, 4)
            self._parts = {k: [0.0, 0] for k in self._parts}
            c_rr, c_retain = self._coefficients()
            logs["c_rr"], logs["c_retain"] = round(c_rr, 4), round(c_retain, 4)
        super().log(logs, start_time)
