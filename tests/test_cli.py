"""The command line explains itself: every flag has help under a group, defaults come from the code, a typo is
named with the nearest flag, `derta data` alone lists its subcommands, derta's own flags work after the subcommand,
and an unreachable hub name or an empty distillation is one line."""

import argparse
import sys
import time

import pytest

from derta.cli.common import GROUPS, HelpFormatter
from derta.cli.main import build_parser, main


def leaf_commands(parser=None, prefix=()):
    """(words, parser) of every command that runs (the subcommands of `derta data` included)."""
    parser = parser or build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [(prefix, parser)]
    return [leaf for name, p in subs[0].choices.items() for leaf in leaf_commands(p, (*prefix, name))]


LEAVES = leaf_commands()


def test_every_command_is_walked():
    names = {" ".join(words) for words, _ in LEAVES}
    assert {"train", "eval", "data build", "data distill", "demo", "bench", "score", "judge"} <= names
    assert len(names) == 17


@pytest.mark.parametrize("words, parser", LEAVES, ids=[" ".join(w) for w, _ in LEAVES])
def test_every_flag_has_help_a_group_and_its_default(words, parser):
    titles = set(GROUPS.values())
    grouped = {id(a) for g in parser._action_groups if g.title in titles for a in g._group_actions}
    formatter = HelpFormatter(prog="derta")
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, f"derta {' '.join(words)} {action.option_strings[0]} has no help"
        assert id(action) in grouped, f"derta {' '.join(words)} {action.option_strings[0]} is in no group"
        if action.default not in (None, False, argparse.SUPPRESS):
            shown = formatter._expand_help(action)
            assert str(action.default) in shown and "default" in shown, (words, action.option_strings, shown)


def test_defaults_shown_are_the_configs():
    from derta.eval.safety import EvalConfig

    eval_help = dict(LEAVES)[("eval",)].format_help()
    assert f"(default: {EvalConfig(out='', prompts='').max_new_tokens})" in " ".join(eval_help.split())
    assert "model: " in eval_help and "generation:" in eval_help and "output: " in eval_help


def test_unknown_flag_is_named_with_the_nearest_known_one(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "build", "--recipie", "derta"])  # and --safety, --out missing: the typo is what is reported
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "derta data build: error: unknown flag --recipie (did you mean --recipe?)"
    )
    with pytest.raises(SystemExit):
        main(["evl", "--model", "m"])
    assert "unknown command 'evl' (did you mean derta eval?)" in capsys.readouterr().err
    # A global flag mistyped before the command is named too, not the command's missing flags.
    for argv, line in (
        (["--debg", "eval"], "derta: error: unknown flag --debg (did you mean --debug?)"),
        (["data", "--foo", "build"], "derta data: error: unknown flag --foo; derta data --help lists them"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1] == line


def test_a_command_group_alone_lists_its_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and all(name in err for name in ("build", "distill", "donotanswer", "triples"))
    assert err.strip().splitlines()[-1] == "derta data: error: choose one of the commands above"


def test_derta_flags_work_after_the_subcommand_and_old_names_are_kept():
    base = ["eval", "--model", "m", "--prompts", "p.jsonl", "--out", "o"]
    assert build_parser().parse_args(base).trust_remote_code is False
    assert build_parser().parse_args([*base, "--trust-remote-code"]).trust_remote_code is True
    assert build_parser().parse_args(["--trust-remote-code", *base]).trust_remote_code is True
    assert build_parser().parse_args([*base, "--debug"]).debug is True
    train = ["train", "--model", "m", "--data", "d.jsonl"]
    assert build_parser().parse_args([*train, "--out", "t"]).out == "t"
    assert build_parser().parse_args([*train, "--output", "t"]).out == "t"
    bench = build_parser().parse_args(["bench", "--out", "b", "--batch", "3", "--vocab", "600"])
    assert (bench.batch, bench.vocab) == (3, 600)


def test_a_bare_name_offline_is_one_line_within_seconds(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from derta import hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    if "datasets" in sys.modules:  # go_offline switches it too: restored after the test
        monkeypatch.setattr(
            sys.modules["datasets"].config, "HF_HUB_OFFLINE", sys.modules["datasets"].config.HF_HUB_OFFLINE
        )
    hub.offline_reason.cache_clear()
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "harmful_response": "b c"}\n')
    started = time.monotonic()
    try:
        code = main(["probe", "--model", "tuned", "--data", str(data), "--out", str(tmp_path / "p.json")])
    finally:
        hub.offline_reason.cache_clear()
    assert code == 2 and time.monotonic() - started < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["derta: error: no directory 'tuned' here, and the hub is offline (HF_HUB_OFFLINE is set)"]


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from derta.io import show_progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not show_progress() and not show_progress(True)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert show_progress() and show_progress(True) and not show_progress(False)
