"""What every command shares: the flags that choose a model to generate with, and small argument helpers.

Command modules build their parsers from light modules only and import the stage that runs a command
inside its `cmd_*` function, so `derta --help` (and a typo's error) comes back without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import os
import re
import sys

from derta.inference.backends import BACKENDS
from derta.io import InputError, loads
from derta.models.loading import DTYPES
from derta.models.precision import CPU_BF16_CHOICES
from derta.models.templates import TEMPLATES


class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default from the code ("(default: 16)"), so help texts never restate one."""

    def _get_help_string(self, action) -> str:
        help = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings or "default" in help:
            return help
        return f"{help} (default: %(default)s)".lstrip()


# The sections a command's --help lists its flags under, in this order (a command uses those it needs).
GROUPS = {
    "model": "model: what generates or is trained, and how it is prompted",
    "data": "data: what is read",
    "training": "training",
    "generation": "generation",
    "evaluation": "evaluation: attacks, judges, scores",
    "output": "output: what is written, and resuming",
    "run": "run",
}


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors lead to the fix: an unknown flag is named as unknown with the nearest known
    one (before any complaint about a required flag), an unknown command gets the nearest command, and a command
    given without its subcommand lists them."""

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)
        # A group's own flags end at its command: an unknown one there is named before the command runs.
        if self._commands() and self.unknown_flags():
            self.error("")
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and not self._commands():  # a leaf command: nothing after it belongs to a parent
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def _commands(self) -> dict:
        return next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})

    def unknown_flags(self) -> list[str]:
        """The option-like words of the command line this parser does not know (up to its subcommand)."""
        known, commands, out = self._option_string_actions, self._commands(), []
        for word in getattr(self, "_argv", []):
            if word == "--" or commands and not word.startswith("-"):
                break  # a command group's flags end at its subcommand (known or not)
            name = word.split("=", 1)[0]
            if not name.startswith("-") or name == "-" or " " in name or _number(name):
                continue
            if name in known or (self.allow_abbrev and len(name) > 2 and any(k.startswith(name) for k in known)):
                continue
            out.append(name)
        return out

    def error(self, message: str):
        unknown = self.unknown_flags()
        if unknown:
            flags = [k for k in self._option_string_actions if k.startswith("--")]
            near = difflib.get_close_matches(unknown[0], flags, n=1, cutoff=0.6)
            hint = f" (did you mean {near[0]}?)" if near else f"; {self.prog} --help lists them"
            message = f"unknown flag {unknown[0]}{hint}"
        elif (commands := self._commands()) and not any(w in commands for w in getattr(self, "_argv", [])):
            choice = re.search(r"invalid choice: '([^']*)'", message)
            if choice is None:  # no subcommand at all: show them
                self.print_help(sys.stderr)
                self.exit(2, f"{self.prog}: error: choose one of the commands above\n")
            near = difflib.get_close_matches(choice.group(1), list(commands), n=1, cutoff=0.5)
            if near:
                message = f"unknown command '{choice.group(1)}' (did you mean {self.prog} {near[0]}?)"
        super().error(message)


def _number(word: str) -> bool:
    """A negative value such as -1e-3 or -inf, which argparse reads as a value, not a flag."""
    try:
        float(word)
    except ValueError:
        return False
    return True


def group(p: argparse.ArgumentParser, name: str):
    """The argument group `name` (a key of GROUPS) of a command's parser, where its --help lists those flags."""
    for g in p._action_groups:
        if g.title == GROUPS[name]:
            return g
    return p.add_argument_group(GROUPS[name])


def add_command(sub, name: str, help: str, func) -> argparse.ArgumentParser:
    """A subcommand whose help shows its defaults under GROUPS, and which takes derta's own flags after its name
    too (`derta eval ... --trust-remote-code`)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(func=func)
    for title in GROUPS.values():
        p.add_argument_group(title)  # fixed order; empty groups are not shown
    add_global_flags(group(p, "run"), argparse.SUPPRESS)
    return p


def add_global_flags(p, default=False) -> None:
    """--trust-remote-code and --debug: before the command (`derta --debug eval`) or after it."""
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=default,
        help="allow model repos to run their own code (off by default)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show the traceback of an unexpected error (also DERTA_DEBUG=1)",
    )


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
        "--template",
        default="auto",
        help=help
        or f"prompt format: {' | '.join(TEMPLATES)} | a format string with {{instruction}} "
        "(auto: the tokenizer's chat template when it has one)",
    )


def add_generation(p, max_new_tokens: int, why: str, batch_size: int = 16) -> None:
    """The flags of a command that generates with a model, in its model and generation groups: backend, prompt
    format, dtype, endpoint; length cap (`why` says why this command's cap is what it is) and batch."""
    m, g = group(p, "model"), group(p, "generation")
    m.add_argument("--backend", default="hf", choices=BACKENDS, help="hf (transformers), vllm, or an openai endpoint")
    add_template(m)
    m.add_argument("--system", help="system prompt for chat inputs")
    m.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype to load weights in (hf, vllm)")
    m.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL); key from $OPENAI_API_KEY",
    )
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"length cap of a response: {why}")
    g.add_argument("--batch-size", type=int, default=batch_size, help="prompts generated at once")
    add_cpu_bf16(g)


def add_cpu_bf16(g) -> None:
    """--cpu-bf16 of a command that generates: off by default, since bf16's greedy text can differ from float32's."""
    g.add_argument(
        "--cpu-bf16",
        default="off",
        choices=CPU_BF16_CHOICES,
        help="bf16 autocast for the hf backend on a CPU (auto: when the CPU does bf16 in hardware, AVX512-BF16 or "
        "AMX); faster there, and its greedy text can differ from float32's",
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
