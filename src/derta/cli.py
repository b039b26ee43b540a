"""`derta` command line: a thin layer over the library.

Each subcommand parses its flags, calls one library function, and prints where results went.
User errors (`InputError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


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


# ---------------------------------------------------------------- data build


def cmd_data_build(args) -> None:
    from .data import RecipeConfig, load_rows, parse_mapping, build_rows, tokenize_rows, SAFETY_FIELDS, HELPFUL_FIELDS
    from .io import write_jsonl
    from .models import load_tokenizer, refusal_token_id, resolve_template

    cfg = RecipeConfig(
        recipe=args.recipe, seed=args.seed, no_prefix_ratio=args.no_prefix_ratio, cut=args.cut,
        refusal_phrase=args.refusal_phrase, rto_keep_ratio=args.rto_keep_ratio, rto_weight=args.rto_weight,
        template=args.template,
    )
    safety = load_rows(args.safety, SAFETY_FIELDS, parse_mapping(args.safety_columns), kind="safety row")
    helpful = load_rows(args.helpful, HELPFUL_FIELDS, parse_mapping(args.helpful_columns), kind="helpful row") if args.helpful else []
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    rows = build_rows(cfg, safety, helpful, tokenizer=tok)
    if tok is not None:
        cfg.template = resolve_template(tok, cfg.template)
        rows = tokenize_rows(rows, tok, cfg, refusal_token_id(tok, cfg.refusal_phrase))
    write_jsonl(args.out, rows)
    counts = {k: sum(r["kind"] == k for r in rows) for k in ("helpful", "safe", "prefix", "rto")}
    print(f"wrote {len(rows)} rows to {args.out} ({', '.join(f'{k} {v}' for k, v in counts.items() if v)})")


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build training data")
    dsub = p.add_subparsers(dest="data_command", required=True)
    b = dsub.add_parser("build", help="turn safety triples and helpful rows into recipe rows (JSONL)")
    b.add_argument("--recipe", required=True, choices=["vanilla", "prefix", "rto", "derta"])
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
    b.add_argument("--template", default="auto", help="auto | chat | inst | raw | a format string with {instruction}")
    b.set_defaults(func=cmd_data_build)


# ---------------------------------------------------------------- train


def cmd_train(args) -> None:
    from .train import run_from_cli

    print(f"saved model to {run_from_cli(args)}")


def _add_train(sub) -> None:
    from .train import add_train_arguments

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


# ---------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="derta", description=__doc__.splitlines()[0])
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model repos to run their own code (off by default)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_tiny, _add_data, _add_train, _add_probe):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .io import InputError

    _quiet_libraries()
    args = build_parser().parse_args(argv)
    from . import models

    models.TRUST_REMOTE_CODE = args.trust_remote_code
    try:
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
