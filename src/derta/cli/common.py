"""What every command shares: the flags that choose a model to generate with, and small argument helpers.

Command modules build their parsers from light modules only and import the stage that runs a command
inside its `cmd_*` function, so `derta --help` (and a typo's error) comes back without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os

from derta.inference.backends import BACKENDS
from derta.io import InputError, loads
from derta.models.loading import DTYPES
from derta.models.templates import TEMPLATES


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default from the code ("(default: 16)"), so help texts never restate one."""

    def _get_help_string(self, action) -> str:
        help = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in help:
            return help
        return f"{help} (default: %(default)s)".lstrip()


def add_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand whose help shows its defaults."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    return p


def from_args(target, args, **given):
    """`target(...)` (a config dataclass or a library function) with every parameter that has a flag of the same name
    taken from `args`, and `given` on top: flags are named after what they set, so no command maps them by hand."""
    if dataclasses.is_dataclass(target):
        names = [f.name for f in dataclasses.fields(target)]
    else:
        names = list(inspect.signature(target).parameters)
    return target(**{**{n: getattr(args, n) for n in names if hasattr(args, n)}, **given})


def main_process() -> bool:
    """False in the other processes of a torchrun / accelerate launch run: only the main one prints the outcome."""
    return int(os.environ.get("RANK", "0")) == 0


def json_arg(text: str | None, flag: str) -> dict | None:
    """A flag whose value is a JSON object, or None when it was not given."""
    if not text:
        return None
    try:
        value = loads(text)
    except InputError as e:
        raise InputError(f"{flag}: {e}") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag}: expected a JSON object")
    return value


def add_template(p, help: str | None = None) -> None:
    p.add_argument(
        "--template", default="auto", help=help or f"{' | '.join(TEMPLATES)} | a format string with {{instruction}}"
    )


def add_generation(p, max_new_tokens: int, batch_size: int = 16, backends: bool = True) -> None:
    """The flags of a command that generates with a model: backend, length cap, batch, prompt format, dtype, endpoint."""
    if backends:
        p.add_argument("--backend", default="hf", choices=BACKENDS)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--batch-size", type=int, default=batch_size)
    add_template(p)
    if backends:
        p.add_argument("--system", help="system prompt for chat inputs")
        p.add_argument("--dtype", default="auto", choices=DTYPES)
        p.add_argument(
            "--base-url",
            help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL); key from $OPENAI_API_KEY",
        )


def add_restart(p, what: str = "--out") -> None:
    p.add_argument(
        "--restart",
        action="store_true",
        help=f"discard what an earlier run left in {what} and start over (instead of resuming it)",
    )


def restart_runs(args, *dirs) -> None:
    """`--restart`: the run directories a command resumes from are emptied of their run files first."""
    from derta.eval.runner import discard_run

    if args.restart:
        for d in dirs:
            discard_run(d)
