"""The `derta` command: a thin layer over the library.

Each subcommand parses its flags, calls one library function, and prints where results went.
User errors (`InputError`) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from derta import __version__
from derta.cli import data, evaluate, recipes, train
from derta.io import NUMERIC_RULES, InputError, check_number, check_writable
from derta.models import loading

# Commands whose --out/--output is a directory (the others write one file).
DIRECTORY_OUTPUTS = {
    "tiny",
    "convert",
    "train",
    "calibrate",
    "eval",
    "eval-helpful",
    "eval-overrefusal",
    "demo",
    "bench",
    "data donotanswer",
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="derta",
        description="Decoupled Refusal Training (DeRTa): train language models to refuse harmful requests "
        "at any position of a response, and evaluate whether they do.",
    )
    parser.add_argument("--version", action="version", version=f"derta {__version__}")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow model repos to run their own code (off by default)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in (data, train, evaluate, recipes):
        stage.add_commands(sub)
    return parser


def check_args(args) -> None:
    """Checks every command shares, before any work: numeric ranges (named by flag) and writable outputs."""
    for dest, value in vars(args).items():
        if dest in NUMERIC_RULES and isinstance(value, (int, float)):
            check_number(value, "--" + dest.replace("_", "-"), NUMERIC_RULES[dest])
    command = args.command if args.command != "data" else f"data {args.data_command}"
    for dest in ("out", "output", "plot"):
        if getattr(args, dest, None):
            check_writable(getattr(args, dest), f"--{dest}", directory=dest != "plot" and command in DIRECTORY_OUTPUTS)


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    loading.TRUST_REMOTE_CODE = args.trust_remote_code
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
