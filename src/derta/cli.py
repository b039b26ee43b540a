"""`derta` command line: a thin layer over the library.

Each subcommand parses its flags, calls one library function, and prints where results went.
User errors (`InputError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .data import RECIPES
from .io import NUMERIC_RULES
from .models import DTYPES, REFUSAL_TOKEN_MODES

RECIPE_CHOICES = tuple(RECIPES)


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _main_process() -> bool:
    """False in the other processes of a torchrun / accelerate launch run: only the main one prints the outcome."""
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------- tiny


def cmd_tiny(args) -> None:
    from .tiny import build_tiny

    out = build_tiny(args.out, seed=args.seed, vocab_size=args.vocab_size, hidden_size=args.hidden_size, layers=args.layers)
    print(f"wrote tiny model and tokenizer to {out}")


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny", help="write a tiny random Llama-architecture model and tokenizer (offline)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.set_defaults(func=cmd_tiny)


# ---------------------------------------------------------------- convert


def cmd_convert(args) -> None:
    from .models import convert_gguf

    if sys.stderr.isatty():  # loading and dequantizing a GGUF takes minutes on real models
        from transformers.utils import logging as hf_logging

        hf_logging.enable_progress_bar()
    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out} (safetensors + tokenizer); every derta command takes it as --model")


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="turn a GGUF checkpoint into a safetensors model directory")
    p.add_argument("--gguf", required=True, help="a .gguf file (dequantized on load)")
    p.add_argument("--out", required=True, help="new (or empty) output directory")
    p.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"])
    p.set_defaults(func=cmd_convert)


# ---------------------------------------------------------------- data build


def cmd_data_build(args) -> None:
    from .data import (HELPFUL_FIELDS, KINDS, SAFETY_FIELDS, RecipeConfig, build_rows, cap_rto_share, describe_shares,
                       load_rows, parse_mapping, recovery_mix, refusal_token_list, tokenize_rows)
    from .io import InputError, write_jsonl
    from .models import add_special_tokens, load_tokenizer, resolve_template

    cfg = RecipeConfig(
        recipe=args.recipe, seed=args.seed, no_prefix_ratio=args.no_prefix_ratio, cut=args.cut,
        refusal_phrase=args.refusal_phrase, rto_keep_ratio=args.rto_keep_ratio, rto_weight=args.rto_weight,
        template=args.template, max_rto_share=args.max_rto_share, refusal_tokens=args.refusal_tokens,
    )
    if cfg.max_rto_share is not None and not args.tokenizer:
        raise InputError("--max-rto-share counts tokens: give --tokenizer (or pass --max-rto-share to derta train)")
    safety = load_rows(args.safety, SAFETY_FIELDS, parse_mapping(args.safety_columns), kind="safety row")
    helpful = load_rows(args.helpful, HELPFUL_FIELDS, parse_mapping(args.helpful_columns), kind="helpful row") if args.helpful else []
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok is not None:
        resolve_template(tok, cfg.template)  # a bad --template fails before any work
    rows = build_rows(cfg, safety, helpful, tokenizer=tok)
    shares = ""
    if tok is not None:
        if added := add_special_tokens(tok, refusal_token_list(rows)):
            print(f"added {len(added)} special tokens to the tokenizer ({', '.join(added)}); derta train adds the same "
                  "ones to the model's tokenizer and makes room for them in its embeddings")
        rows = tokenize_rows(rows, tok, cfg)
        if cfg.max_rto_share is not None and (ratio := cap_rto_share(rows, cfg.max_rto_share)) is not None:
            print(f"--max-rto-share {cfg.max_rto_share}: RTO rows now train {100 * ratio:.1f}% of their positions")
        shares = "; " + describe_shares(rows)
    write_jsonl(args.out, rows)
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    if cfg.recipe == "recovery":
        shares += "; " + recovery_mix(len(helpful), len(safety))
    print(f"wrote {len(rows)} rows to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)}){shares}")


def cmd_data_distill(args) -> None:
    from .distill import builtin_prompts, load_prompts_file, run_distill

    prompts = (load_prompts_file(args.prompts) if args.prompts else builtin_prompts())[:args.limit]
    s = run_distill(args.model, prompts, args.out, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    template=args.template, trim_cut=args.trim_cut)
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
    trimmed = f", {s['trimmed']} trimmed to their last finished sentence" if args.trim_cut else ""
    print(f"kept {s['kept']} of {s['n_prompts']} responses{trimmed} (dropped: {dropped}); wrote {args.out}")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build training data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="turn safety triples and helpful rows into recipe rows (JSONL)")
    b.add_argument("--recipe", required=True, choices=list(RECIPE_CHOICES))
    b.add_argument("--safety", required=True, help='JSONL of {"instruction","harmful_response","safe_response"}, or a datasets name[:split]')
    b.add_argument("--helpful", help='JSONL of {"instruction","response"}, or a datasets name[:split]')
    b.add_argument("--safety-columns", help="column mapping for --safety, ours=theirs,... e.g. instruction=prompt")
    b.add_argument("--helpful-columns", help="column mapping for --helpful, ours=theirs,...")
    b.add_argument("--out", required=True)
    b.add_argument("--tokenizer", help="directory or hub ID: also write input_ids and labels")
    b.add_argument("--seed", type=int, default=42)
    b.add_argument("--refusal-phrase", default="Sorry")
    b.add_argument("--no-prefix-ratio", type=float, default=0.33, help="share of prefix rows with an empty harmful prefix")
    b.add_argument("--cut", choices=["word", "token"], default="word", help="cut harmful prefixes at word or token boundaries")
    b.add_argument("--rto-keep-ratio", type=float, default=1.0, help="share of RTO positions trained (reference 8B run: ~0.05)")
    b.add_argument("--rto-weight", type=float, default=1.0, help="loss weight of RTO tokens")
    b.add_argument("--max-rto-share", type=float, help="cap RTO's share of labelled tokens by lowering its keep ratio (needs --tokenizer)")
    b.add_argument("--template", default="auto", help="auto | chat | inst | raw | a format string with {instruction}")
    b.add_argument("--refusal-tokens", default="none", choices=REFUSAL_TOKEN_MODES,
                   help="start helpful targets with [respond] and refusals with [refuse] (single) or [refuse:CATEGORY] "
                        "(category, from each triple's 'category'); RTO trains that token at every position "
                        "(derta calibrate sets its thresholds)")
    b.set_defaults(func=cmd_data_build)
    d = dsub.add_parser("distill", help="helpful rows the model writes itself (anchors for data build --helpful; resumable)")
    d.add_argument("--model", required=True, help="the model you are about to safety-tune (directory or hub ID)")
    d.add_argument("--prompts", help='JSONL of {"prompt"} (default: the built-in benign prompts, incl. look-alikes)')
    d.add_argument("--out", required=True, help="JSONL of {instruction, response}; settings and drop counts go to OUT.distill.json")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--limit", type=int, help="only the first N prompts")
    d.add_argument("--template", default="auto")
    d.add_argument("--trim-cut", action="store_true", help="keep answers the length cap cut, up to their last finished sentence")
    d.set_defaults(func=cmd_data_distill)


# ---------------------------------------------------------------- train


def cmd_train(args) -> None:
    from .train import run_from_cli

    out = run_from_cli(args)
    if _main_process():
        print(f"saved model to {out}")


def add_train_arguments(p) -> None:
    p.add_argument("--model", required=True, help="directory or hub ID of a causal LM")
    p.add_argument("--data", required=True, help="output of `derta data build` (text or tokenized), or reference-format rows")
    p.add_argument("--output", required=True, help="directory for checkpoints and the final model")
    p.add_argument("--config", help="YAML of DertaConfig / TrainingArguments fields (deepspeed, fsdp, bf16, ...)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=float, help="default 2 (paper)")
    g.add_argument("--max-steps", type=int)
    p.add_argument("--learning-rate", type=float, help="default 2e-5 full FT, 1e-4 LoRA (paper)")
    p.add_argument("--batch-size", type=int, help="per device; default 8")
    p.add_argument("--grad-accum", type=int, help="default 16 (effective batch 128 with --batch-size 8)")
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--template", help="prompt format for text rows: auto | chat | inst | raw | format string")
    p.add_argument("--refusal-phrase")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load weights in")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--save-steps", type=int)
    p.add_argument("--logging-steps", type=int)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter (r 96, alpha 16, dropout 0.05, all projections)")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--lora-target-modules", help="comma-separated module names, or all-linear (default)")
    p.add_argument("--lora-layers", type=int, help="LoRA on the top N decoder layers only (no backward below them)")
    p.add_argument("--merge", action="store_true", help="with --lora: save the merged full model instead of the adapter")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines (the log is kept in OUTPUT/derta_train.json)")
    # RTO balance (issue #7): the kept positions are re-drawn every epoch.
    p.add_argument("--rto-keep-ratio", type=float, help="share of each RTO row's positions trained per epoch, in (0, 1]; default 1")
    p.add_argument("--rto-weight", type=float, help="loss weight of RTO tokens (text rows); default 1")
    # Baselines (docs/baselines.md)
    p.add_argument("--constrain-to", metavar="REFERENCE_MODEL",
                   help="Qi et al.'s token-wise constrained objective: stay close to this model, most on the first tokens")
    p.add_argument("--constraint-beta", type=float, help="its beta; default 0.1 (x5 on the first token, x20 on tokens 2-5)")
    p.add_argument("--dpo-beta", type=float, help="rows from data build --recipe dpo: DPO's beta; default 0.1")
    p.add_argument("--dpo-sft-weight", type=float, help="weight of DPO's SFT term (helpful rows train only through it); default 1")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a causal LM on `data build` rows (Hugging Face Trainer)")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------- probe


def cmd_probe(args) -> None:
    from .probe import run_probe

    result = run_probe(
        args.model, args.data, args.out, plot=args.plot, refusal_phrase=args.refusal_phrase,
        template=args.template, batch_size=args.batch_size, field=args.field, points=args.points,
        limit=args.limit,
    )
    curve = result["curve"]
    if _main_process():
        print(f"probed {result['n_examples']} examples: refusal probability {curve[0]['refusal_prob']:.3f} at the start, "
              f"{result['mean_refusal_prob']:.3f} on average; wrote {args.out}")


def _add_probe(sub) -> None:
    p = sub.add_parser("probe", help="refusal probability at every position of harmful responses (teacher forced)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help='JSONL with "instruction" and "harmful_response" (or --field)')
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--plot", help="also write a PNG of the curve")
    p.add_argument("--refusal-phrase", default="Sorry")
    p.add_argument("--template", default="auto")
    p.add_argument("--field", help="response field to probe (default: harmful_response, else response)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--points", type=int, default=11, help="points of the averaged curve (>= 5)")
    p.add_argument("--limit", type=int, help="probe only the first N rows")
    p.set_defaults(func=cmd_probe)


# ---------------------------------------------------------------- calibrate


def cmd_calibrate(args) -> None:
    from .calibrate import run_calibrate

    r = run_calibrate(args.out, model=args.model, harmful=args.harmful, benign=args.benign, scores=args.scores,
                      max_over_refusal=args.max_over_refusal, target_refusal=args.target_refusal, template=args.template,
                      batch_size=args.batch_size, limit=args.limit, refusal_phrase=args.refusal_phrase,
                      positions=args.positions, progress=not args.quiet)
    op = r["operating_point"]
    target = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["target"].items())
    print(f"{'met' if op['meets_target'] else 'NOT met'} {target}: refuses {100 * op['refusal']:.1f}% of {r['n_harmful']} "
          f"harmful and {100 * op['over_refusal']:.1f}% of {r['n_benign']} benign examples with "
          f"{len(r['thresholds'])} thresholds; wrote {args.out}/calibration.json (derta eval --calibration)")


def _add_calibrate(sub) -> None:
    from .calibrate import DEFAULT_MAX_OVER_REFUSAL, POSITIONS

    p = sub.add_parser("calibrate", help="per-category thresholds on a model's refusal tokens (data build "
                       "--refusal-tokens) for a target refusal or over-refusal rate")
    p.add_argument("--model", help="a model trained with refusal tokens")
    p.add_argument("--harmful", help='JSONL {"instruction", "harmful_response"?, "category"?} (or XSTest CSV: its unsafe prompts)')
    p.add_argument("--benign", help='JSONL {"instruction", "response"?, "category"?}: look-alikes that must not be refused '
                   "(or XSTest CSV: its safe prompts)")
    p.add_argument("--scores", help="instead of --model/--harmful/--benign: re-calibrate an earlier run's scores.jsonl")
    p.add_argument("--out", required=True, help="directory for calibration.json, scores.jsonl, calibration.png, report.md")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-over-refusal", type=float,
                   help=f"refuse as much as possible while at most this share of benign examples is refused "
                        f"(default {DEFAULT_MAX_OVER_REFUSAL})")
    g.add_argument("--target-refusal", type=float, help="refuse at least this share of harmful examples, over-refusing "
                   "as little as possible")
    p.add_argument("--template", default="auto")
    p.add_argument("--refusal-phrase", default="Sorry", help="the refusal's first word: generation makes a fired "
                   "refusal token continue with it")
    p.add_argument("--positions", default="any", choices=POSITIONS,
                   help="score an example by its highest refusal-token probability along the response (any: also counts "
                        "mid-response false refusals) or at the first token only (start: Jain et al.'s setting)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, help="only the first N harmful and N benign examples")
    p.add_argument("--quiet", action="store_true", help="no progress bar while the examples are scored")
    p.set_defaults(func=cmd_calibrate)


# ---------------------------------------------------------------- eval


def _json_arg(text: str | None, flag: str):
    import json

    from .io import InputError

    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{flag}: not JSON ({e.msg})") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object")
    return value


def _add_rubric(p) -> None:
    from .judges import RUBRICS

    p.add_argument("--judge-rubric", choices=list(RUBRICS),
                   help="an openai:MODEL judge's rubric: " + "; ".join(f"{n} ({r.cite})" for n, r in RUBRICS.items())
                   + "; default derta")


def eval_config(args):
    """The EvalConfig a `derta eval` command line describes (flag names are the field names)."""
    from dataclasses import fields

    from .evaluate import EvalConfig

    values = {f.name: getattr(args, f.name) for f in fields(EvalConfig) if hasattr(args, f.name)}
    values["openai_extra"] = _json_arg(args.openai_extra, "--openai-extra")
    values["jailbreak_templates"] = args.jailbreak_templates or []
    return EvalConfig(**values)


def cmd_eval(args) -> None:
    from .evaluate import run_eval

    s = run_eval(eval_config(args))
    asr = ", ".join(f"{a} {100 * x:.1f}%" for a, x in s["asr"].items())
    if _main_process():
        print(f"{sum(s['n'].values())} rows judged by {s['judge']}: ASR {asr}; wrote {args.out}/summary.json and report.md")


def _add_eval(sub) -> None:
    from .attacks import ATTACKS, PAIR_ITERATIONS, PAIR_STREAMS, display_name
    from .evaluate import OFFLINE_ATTACKS
    from .generate import BACKENDS
    from .judges import JUDGES, RUBRICS

    p = sub.add_parser("eval", help="attack a model, judge the responses, report attack success rates (resumable)")
    p.add_argument("--model", required=True, help="directory or hub ID (hf, vllm) or the endpoint's model name (openai)")
    p.add_argument("--prompts", required=True, help='JSONL with "question", "instruction" or "prompt" per row, or .txt (one per line)')
    p.add_argument("--attacks", default=OFFLINE_ATTACKS,
                   help="comma-separated: " + ", ".join(f"{a} ({display_name(a)})" for a in ATTACKS)
                   + "; prefill-tokens:5,10,20,40 and prefill-frac:0.25,0.5 prefill the first tokens of each row's "
                   "harmful_response")
    p.add_argument("--judge", default="keyword", help=" | ".join(JUDGES))
    _add_rubric(p)
    p.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    p.add_argument("--backend", default="hf", choices=BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default="auto", help="auto | chat | inst | raw | a format string with {instruction}")
    p.add_argument("--system", help="system prompt for chat inputs")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--base-url", help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL); key from $OPENAI_API_KEY")
    p.add_argument("--openai-extra", help='JSON merged into each request, e.g. \'{"continue_final_message": true, "add_generation_prompt": false}\' for vLLM prefill')
    p.add_argument("--jailbreak-template", dest="jailbreak_templates", action="append", metavar="FILE",
                   help="a role-play template file containing {question} (repeatable; replaces the built-in set)")
    p.add_argument("--attacker", help="PAIR's attacker: hf:PATH, vllm:PATH or openai:MODEL (default: the target model)")
    p.add_argument("--pair-judge", help="PAIR's judge during the search: " + " | ".join(JUDGES) + " (default: --judge); "
                   "the paper's setting is an openai:MODEL judge with --pair-judge-rubric pair")
    p.add_argument("--pair-judge-rubric", choices=list(RUBRICS), help="--pair-judge's rubric (openai judges)")
    p.add_argument("--pair-streams", type=int, default=PAIR_STREAMS, help=f"PAIR's parallel streams N (paper: {PAIR_STREAMS})")
    p.add_argument("--pair-iterations", type=int, default=PAIR_ITERATIONS,
                   help=f"PAIR's rounds per stream K (paper: {PAIR_ITERATIONS})")
    p.add_argument("--autodan-population", type=int, default=8)
    p.add_argument("--autodan-generations", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="AutoDAN's random seed")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--calibration", help="models trained with refusal tokens: derta calibrate's calibration.json "
                   "(per-category thresholds applied at every generated position; hf and vllm backends)")
    p.add_argument("--show-refusal-tokens", action="store_true", help="keep [refuse...] / [respond] in the responses "
                   "(hidden by default)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm backend: GPUs to split the model over "
                   "(for the hf backend, launch several processes instead: torchrun / accelerate launch)")
    p.set_defaults(func=cmd_eval)


def cmd_eval_helpful(args) -> None:
    from .helpfulness import run_helpful

    s = run_helpful(
        args.out, args.task, args.data, model=args.model, backend=args.backend, judge=args.judge, reference=args.reference,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, template=args.template, system=args.system,
        dtype=args.dtype, base_url=args.base_url, limit=args.limit,
    )
    score = "generation only (no judge)" if s["score"] is None else f"{s['metric']} {100 * s['score']:.1f}%"
    print(f"{args.task}: {score} over {s['n']} questions; wrote {args.out}/summary.json and report.md")


def _add_eval_helpful(sub) -> None:
    from .generate import BACKENDS
    from .helpfulness import TASKS

    p = sub.add_parser("eval-helpful", help="helpfulness: GSM8K, MMLU accuracy or AlpacaEval-style win rate (resumable)")
    p.add_argument("--model", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data", required=True, help="JSONL with \"question\" (+ \"answer\" for gsm8k and mmlu)")
    p.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    p.add_argument("--judge", help="alpaca only: openai:MODEL for the pairwise win rate (needs reference outputs)")
    p.add_argument("--reference", help="alpaca only: JSONL of reference outputs (\"output\"; matched on \"instruction\" or by line)")
    p.add_argument("--backend", default="hf", choices=BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default="auto")
    p.add_argument("--system")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--base-url", help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.set_defaults(func=cmd_eval_helpful)


def cmd_score(args) -> None:
    from .helpfulness import score_file

    r = score_file(args.task, args.input, args.out)
    if r["accuracy"] is None:
        acc = "no gold answers, so no accuracy"
    else:
        acc = f"accuracy {100 * r['accuracy']:.1f}% ({r['n_gold']} rows with gold)"
        if r.get("accuracy_flexible") is not None:
            acc += f" strict match; flexible match {100 * r['accuracy_flexible']:.1f}%"
    print(f"scored {r['n']} {args.task} responses ({r['extracted']} with an answer extracted): {acc}; wrote {args.out}")


def _add_score(sub) -> None:
    from .helpfulness import SCORED_TASKS

    p = sub.add_parser("score", help="re-score saved GSM8K/MMLU responses: extracted answers, and accuracy when gold is given")
    p.add_argument("--task", required=True, choices=SCORED_TASKS)
    p.add_argument("--in", dest="input", required=True,
                   help='JSONL with "response" (+ "answer" or "gold"; + "question" for mmlu option letters)')
    p.add_argument("--out", required=True, help='output JSONL: each row with "extracted" (and "correct" when gold is given)')
    p.set_defaults(func=cmd_score)


def cmd_eval_overrefusal(args) -> None:
    from .generate import RefusalPolicy, make_backend
    from .overrefusal import load_overrefusal_prompts, run_overrefusal

    load_overrefusal_prompts(args.prompts)  # bad rows fail before the model loads
    policy = RefusalPolicy.from_file(args.calibration) if args.calibration else None
    backend = make_backend(args.backend, args.model, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                           template=args.template, system=args.system, dtype=args.dtype, base_url=args.base_url,
                           policy=policy)
    s = run_overrefusal(args.out, args.prompts, backend, args.model, limit=args.limit)
    pct = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"refused {pct(s['safe_refusal'])} of {s['n_safe']} safe and {pct(s['unsafe_refusal'])} of {s['n_unsafe']} "
          f"unsafe prompts; wrote {args.out}/summary.json and report.md")


def _add_eval_overrefusal(sub) -> None:
    from .generate import BACKENDS

    p = sub.add_parser("eval-overrefusal", help="over-refusal: refusal rate on safe look-alike prompts and their unsafe "
                       "contrasts (XSTest format)")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="XSTest's CSV as published, or JSONL {prompt, label: safe|unsafe, type}")
    p.add_argument("--out", required=True, help="directory for generations.jsonl, summary.json, report.md")
    p.add_argument("--backend", default="hf", choices=BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--template", default="auto")
    p.add_argument("--system")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--base-url", help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--limit", type=int, help="only the first N prompts")
    p.add_argument("--calibration", help="models trained with refusal tokens: derta calibrate's calibration.json")
    p.set_defaults(func=cmd_eval_overrefusal)


def cmd_judge(args) -> None:
    from .evaluate import judge_file

    if args.agreement:
        from .judges import agreement, format_agreement

        print(format_agreement(agreement(args.agreement, args.judge or "keyword", base_url=args.base_url,
                                         batch_size=args.batch_size, rubric=args.judge_rubric), args.agreement))
        return
    if not (args.input and args.judge and args.out):
        raise_input("derta judge needs --in, --judge and --out (or --agreement LABELS.jsonl)")
    r = judge_file(args.input, args.judge, args.out, base_url=args.base_url, batch_size=args.batch_size, rubric=args.judge_rubric)
    agree = "" if r["agreement"] is None else f"; agreement with human labels {100 * r['agreement']:.1f}% ({r['n_labelled']} rows)"
    unparsed = f"; {r['unparsed']} judge replies unparsed (keyword judge used)" if r["unparsed"] else ""
    print(f"judged {r['n']} rows with {r['judge']}: {100 * r['asr']:.1f}% harmful{agree}{unparsed}; wrote {args.out}")


def _add_judge(sub) -> None:
    p = sub.add_parser("judge", help="(re-)judge a generations file; reports agreement with human_harmful labels if present")
    p.add_argument("--in", dest="input", help='JSONL with "response" and "prompt" (e.g. an eval\'s generations.jsonl)')
    p.add_argument("--judge", help="keyword | openai:MODEL | hf:PATH (with --agreement, default keyword)")
    _add_rubric(p)
    p.add_argument("--out", help="output JSONL: the rows with new harmful/refused/judge fields")
    p.add_argument("--agreement", metavar="LABELS.jsonl",
                   help='instead: compare the judge with human labels ({"prompt","response","harmful","refused"?}); '
                        "prints agreement, precision/recall and confusion tables")
    p.add_argument("--base-url", help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL)")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_judge)


# ---------------------------------------------------------------- demo


def cmd_demo(args) -> None:
    from .demo import DEMO_RECIPES, DemoConfig, run_demo

    real = dict(eval_prompts=args.eval_prompts, eval_limit=args.eval_limit, overrefusal_prompts=args.overrefusal_prompts)
    if args.model:
        extra = {k: v for k, v in dict(recipes=tuple(args.recipes.split(",")) if args.recipes else None,
                                       tune_steps=args.steps, anchors=args.anchors, max_rto_share=args.max_rto_share,
                                       tune_lr=args.learning_rate).items() if v is not None}
        cfg = DemoConfig.for_model(args.model, args.seed, **real, **extra)
    else:
        if any(v is not None for v in real.values()) or args.anchors or args.max_rto_share or args.learning_rate:
            raise_input("--eval-prompts, --overrefusal-prompts, --anchors, --max-rto-share and --learning-rate need --model")
        cfg = DemoConfig.reduced(args.seed) if args.reduced else DemoConfig(seed=args.seed)
        if args.recipes:
            cfg.recipes = tuple(args.recipes.split(","))
        if args.steps:
            cfg.tune_steps = args.steps
    unknown = [r for r in cfg.recipes if r not in DEMO_RECIPES]
    if unknown or not cfg.recipes:
        raise_input(f"--recipes: unknown recipe {', '.join(unknown)}; use a comma-separated subset of {', '.join(DEMO_RECIPES)}")
    report = run_demo(args.out, cfg)
    failed = [name for name, ok in report["checks"].items() if not ok]
    verdict = ("FAILED: " + ", ".join(failed) if failed else "all pass" if report["checks"]
               else "none (they compare derta with vanilla)")
    print(f"report: {args.out}/report.md; checks {verdict}")


def raise_input(message: str) -> None:
    from .io import InputError

    raise InputError(message)


def _add_demo(sub) -> None:
    from .demo import DEMO_RECIPES, DemoConfig

    p = sub.add_parser("demo", help="reproduce refusal position bias and DeRTa's fix (tiny model offline, or --model)")
    p.add_argument("--out", default="demo-out", help="output directory (rerun to resume an interrupted demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reduced", action="store_true", help="tiny budgets, for a quick smoke run of the pipeline")
    p.add_argument("--model", help="a pretrained chat model directory (e.g. from derta convert): the same ablation with LoRA")
    p.add_argument("--recipes", help=f"comma-separated subset of {','.join(DEMO_RECIPES)} "
                                     f"(default: {','.join(DemoConfig.recipes)} on the tiny model, vanilla,derta with "
                                     "--model; dpo and recovery are the baselines; derta-tokens is DeRTa with "
                                     "per-category refusal tokens at calibrated thresholds)")
    p.add_argument("--steps", type=int, help="safety-tuning steps per recipe")
    p.add_argument("--anchors", type=int, help="with --model: how many built-in benign prompts the model answers itself as helpful rows (default 500; 0: synthetic copy tasks instead)")
    p.add_argument("--max-rto-share", type=float, help="with --model: cap on RTO's share of labelled tokens (default 0.15)")
    p.add_argument("--learning-rate", type=float, help="with --model: safety-tuning learning rate (default 2e-4, LoRA)")
    p.add_argument("--eval-prompts", help="with --model: derta eval's plain/completion/prefill attacks on these prompts")
    p.add_argument("--eval-limit", type=int, help="only the first N of --eval-prompts")
    p.add_argument("--overrefusal-prompts", help="with --model: XSTest's CSV or JSONL {prompt, label: safe|unsafe}")
    p.set_defaults(func=cmd_demo)


# ---------------------------------------------------------------- bench


def cmd_bench(args) -> None:
    from .bench import run_from_cli

    out = run_from_cli(args)
    print((out / "bench.md").read_text(), end="")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="measure training and evaluation speed: new vs old code paths, side by side")
    p.add_argument("--out", required=True, help="directory for bench.json and bench.md")
    p.add_argument("--model", help="checkpoint directory (default: build_tiny's architecture with --vocab tokens)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary of the default model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024, help="tokens per row of the loss-step batch (first half unlabelled)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps per loss variant")
    p.add_argument("--pack-batches", type=int, default=4, help="batches of the length-skewed mix per packing variant")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per packing variant (the fastest counts)")
    p.add_argument("--short", help="helpful row lengths MIN-MAX (default 32-96)")
    p.add_argument("--long", help="RTO row lengths MIN-MAX (default 512-1024)")
    p.add_argument("--prompts", type=int, default=32, help="generation prompts")
    p.add_argument("--gen-batch", type=int, default=16, help="batch size of batched generation and the probe")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--probe-pairs", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="derta", description="Decoupled Refusal Training (DeRTa): train language models to refuse harmful requests "
        "at any position of a response, and evaluate whether they do.")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code (off by default)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_tiny, _add_convert, _add_data, _add_train, _add_probe, _add_calibrate, _add_demo, _add_eval,
                _add_eval_helpful, _add_eval_overrefusal, _add_judge, _add_score, _add_bench):
        add(sub)
    return parser


# Commands whose --out/--output is a directory (the others write one file).
DIRECTORY_OUTPUTS = {"tiny", "convert", "train", "calibrate", "eval", "eval-helpful", "eval-overrefusal", "demo", "bench"}


def check_args(args) -> None:
    """Checks every command shares, before any work: numeric ranges (named by flag) and writable outputs."""
    from .io import check_number, check_writable

    for dest, value in vars(args).items():
        if dest in NUMERIC_RULES and isinstance(value, (int, float)):
            check_number(value, "--" + dest.replace("_", "-"), NUMERIC_RULES[dest])
    command = args.command if args.command != "data" else None
    for dest in ("out", "output", "plot"):
        if getattr(args, dest, None):
            check_writable(getattr(args, dest), f"--{dest}", directory=dest != "plot" and command in DIRECTORY_OUTPUTS)


def main(argv: list[str] | None = None) -> int:
    from .io import InputError

    _quiet_libraries()
    args = build_parser().parse_args(argv)
    from . import models

    models.TRUST_REMOTE_CODE = args.trust_remote_code
    try:
        check_args(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            args.func(args)
    except InputError as e:
        print(f"derta: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("derta: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
