"""`derta train`: fine-tune a causal LM on `data build` rows. Each flag sets one DertaConfig field."""

from __future__ import annotations

from derta.cli.common import add_command, group, main_process
from derta.models.loading import DTYPES
from derta.models.precision import CPU_BF16_CHOICES
from derta.train.defaults import DEFAULTS, LORA_LR


def cmd_train(args) -> None:
    from derta.train.config import config_from_cli
    from derta.train.run import train

    out = train(
        config_from_cli(args), args.model, args.data, resume=args.resume, dtype=args.dtype, restart=args.restart
    )
    if main_process():
        print(f"saved model to {out}")


def _default(field: str) -> str:
    return f"default {DEFAULTS[field]}"


def add_commands(sub) -> None:
    p = add_command(sub, "train", "fine-tune a causal LM on `data build` rows (Hugging Face Trainer)", cmd_train)
    add_train_arguments(p)


def add_train_arguments(p) -> None:
    # No argparse defaults here: a flag left out keeps what --config's YAML says, else DertaConfig's default.
    m, d, t = group(p, "model"), group(p, "data"), group(p, "training")
    m.add_argument("--model", required=True, help="directory or hub ID of a causal LM")
    m.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load weights in")
    m.add_argument(
        "--template",
        help="prompt format for text rows: auto | chat | inst | raw | format string; " + _default("template"),
    )
    d.add_argument(
        "--data", required=True, help="output of `derta data build` (text or tokenized), or reference-format rows"
    )
    d.add_argument("--max-length", type=int, help="rows are cut to this many tokens; " + _default("max_length"))
    t.add_argument(
        "--config", help="YAML of DertaConfig / TrainingArguments fields (configs/); flags given override it"
    )
    g = t.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help=_default("num_train_epochs") + " (paper)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (instead of --epochs)")
    t.add_argument(
        "--learning-rate",
        type=float,
        help=f"{_default('learning_rate')} full fine-tuning, {LORA_LR} with --lora (paper)",
    )
    t.add_argument("--batch-size", type=int, help="per device; " + _default("per_device_train_batch_size"))
    t.add_argument("--grad-accum", type=int, help=_default("gradient_accumulation_steps"))
    t.add_argument("--seed", type=int, help=_default("seed"))
    t.add_argument("--refusal-phrase", help="the word refusals start with; " + _default("refusal_phrase"))
    t.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    t.add_argument(
        "--cpu-bf16",
        choices=CPU_BF16_CHOICES,
        help="bf16 autocast on the CPU; default auto: on when the CPU does bf16 in hardware (AVX512-BF16, AMX)",
    )
    t.add_argument(
        "--trunk-cache-gb",
        type=float,
        help="GiB for the frozen layers' hidden states, computed once per row and reused when only the top layers "
        "train (--lora-layers); 0: off; " + _default("trunk_cache_gb"),
    )
    t.add_argument(
        "--row-attention",
        choices=("on", "off"),
        help="packed batches attend row by row (causal, no mask) instead of over the whole packed sequence under a "
        "block mask; default on (sdpa models)",
    )
    _add_lora(t)
    _add_objectives(t)
    _add_output(group(p, "output"))


def _add_output(o) -> None:
    o.add_argument("--out", "--output", dest="out", required=True, help="directory for checkpoints and the final model")
    o.add_argument("--save-steps", type=int, help="save a checkpoint every N steps; " + _default("save_steps"))
    o.add_argument("--logging-steps", type=int, help="log every N steps; " + _default("logging_steps"))
    o.add_argument(
        "--quiet", action="store_true", help="no progress bar or log lines (the log is kept in OUT/derta_train.json)"
    )
    g = o.add_mutually_exclusive_group()
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the last checkpoint in --out (with the settings and inputs it started with)",
    )
    g.add_argument(
        "--restart", action="store_true", help="remove an interrupted run's checkpoints from --out and start over"
    )


def _add_lora(p) -> None:
    p.add_argument(
        "--lora",
        action="store_true",
        help=f"train a LoRA adapter (r {DEFAULTS['lora_r']}, alpha "
        f"{DEFAULTS['lora_alpha']}, dropout {DEFAULTS['lora_dropout']}, {DEFAULTS['lora_target_modules']})",
    )
    p.add_argument("--lora-r", type=int, help="LoRA rank; " + _default("lora_r"))
    p.add_argument("--lora-alpha", type=int, help="LoRA scale numerator; " + _default("lora_alpha"))
    p.add_argument("--lora-dropout", type=float, help=_default("lora_dropout"))
    p.add_argument(
        "--lora-target-modules", help="comma-separated module names, or all-linear; " + _default("lora_target_modules")
    )
    p.add_argument("--lora-layers", type=int, help="LoRA on the top N decoder layers only (no backward below them)")
    p.add_argument(
        "--merge", action="store_true", help="with --lora: save the merged full model instead of the adapter"
    )


def _add_objectives(p) -> None:
    # RTO balance: the kept positions are re-drawn every epoch.
    p.add_argument(
        "--rto-keep-ratio",
        type=float,
        help="share of each RTO row's positions trained per epoch, in (0, 1]; "
        "default: what the rows carry (data build --rto-keep-ratio), else 1",
    )
    p.add_argument(
        "--rto-weight", type=float, help="loss weight of RTO tokens (text rows); default: what the rows carry, else 1"
    )
    # Baselines (docs/baselines.md)
    p.add_argument(
        "--constrain-to",
        metavar="REFERENCE_MODEL",
        help="Qi et al.'s token-wise constrained objective: stay close to this model, most on the first tokens",
    )
    p.add_argument(
        "--constraint-beta",
        type=float,
        help=f"its beta; {_default('constraint_beta')} (x5 on the first token, x20 on tokens 2-5)",
    )
    p.add_argument(
        "--dpo-beta", type=float, help="rows from data build --recipe dpo: DPO's beta; " + _default("dpo_beta")
    )
    p.add_argument(
        "--dpo-sft-weight",
        type=float,
        help="weight of DPO's SFT term (helpful rows train only through it); " + _default("dpo_sft_weight"),
    )
    p.add_argument(
        "--cb-alpha",
        type=float,
        help="rows from data build --recipe circuit-breakers: scale of the rerouting/retain schedule; "
        + _default("cb_alpha"),
    )
    p.add_argument(
        "--cb-layers",
        help="layers whose hidden states are rerouted, e.g. 10,20 (auto: 5/16 and 10/16 of the depth); "
        + _default("cb_layers"),
    )
    p.add_argument(
        "--cb-skip-massive",
        type=float,
        help="rerouting cosine without the dimensions whose RMS exceeds this many times the median's (massive "
        "activations); " + _default("cb_skip_massive") + "; 0: every dimension, as the paper",
    )
    p.add_argument(
        "--cb-warmup-steps",
        type=int,
        help="optimizer steps of rerouting alone before the retain loss enters (models with large hidden states); "
        + _default("cb_warmup_steps")
        + ": the paper's schedule",
    )
