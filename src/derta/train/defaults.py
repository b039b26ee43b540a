"""DertaConfig's defaults, the paper's settings where it gives them, and derta train's flags.

A module without transformers in it, so that `derta train --help` shows the defaults without loading
the training stack. Paper: full fine-tuning lr 2e-5 (8B); LoRA lr 1e-4, r 96, alpha 16, dropout 0.05 on
all projection modules (70B); 2 epochs; effective batch 128 (8 per device x 16 accumulation steps).
"""

from __future__ import annotations

from derta.models.refusal_tokens import REFUSAL_PHRASE

FULL_FT_LR, LORA_LR = 2e-5, 1e-4

DEFAULTS = {
    "learning_rate": FULL_FT_LR,
    "num_train_epochs": 2.0,
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 16,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,
    "logging_steps": 10,
    "save_steps": 200,
    "save_total_limit": 2,
    "seed": 42,
    "max_length": 2048,
    "template": "auto",
    "refusal_phrase": REFUSAL_PHRASE,
    "lora_r": 96,
    "lora_alpha": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": "all-linear",
    "constraint_beta": 0.1,
    "dpo_beta": 0.1,
    "dpo_sft_weight": 1.0,
    # Circuit Breakers (Zou et al., 2024; their Llama-3-8B run): alpha 10, rerouting at layers 10 and 20 of 32
    # (`auto`: the same depths, 5/16 and 10/16, on any model).
    "cb_alpha": 10.0,
    "cb_layers": "auto",
    # The rerouting cosine leaves out dimensions 10x the median's RMS (massive activations, train.circuit): none in
    # the tiny model (max 1.7x), so there it is the paper's cosine; SmolLM2's rerouting never starts without it.
    "cb_skip_massive": 10.0,
    # The paper's schedule: the retain loss has weight from the first step on.
    "cb_warmup_steps": 0,
    "trunk_cache_gb": 4.0,
    "row_attention": True,
}

# derta train's flags (argparse dests) and the DertaConfig fields they set; a flag given on the command line wins
# over the same field in --config's YAML.
CLI_TO_CONFIG = {
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "learning_rate": "learning_rate",
    "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "max_length": "max_length",
    "seed": "seed",
    "template": "template",
    "refusal_phrase": "refusal_phrase",
    "save_steps": "save_steps",
    "logging_steps": "logging_steps",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout",
    "lora_target_modules": "lora_target_modules",
    "lora_layers": "lora_layers",
    "rto_keep_ratio": "rto_keep_ratio",
    "rto_weight": "rto_weight",
    "constrain_to": "constrain_to",
    "constraint_beta": "constraint_beta",
    "dpo_beta": "dpo_beta",
    "dpo_sft_weight": "dpo_sft_weight",
    "cb_alpha": "cb_alpha",
    "cb_layers": "cb_layers",
    "cb_skip_massive": "cb_skip_massive",
    "cb_warmup_steps": "cb_warmup_steps",
    "cpu_bf16": "cpu_bf16",
    "trunk_cache_gb": "trunk_cache_gb",
}
