"""derta eval / eval-helpful: inputs, resumable run directories (incl. a real kill -9), summaries, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from derta.cli.main import main
from derta.data.sources import load_prompts
from derta.eval import safety
from derta.eval.answers import gsm8k_flexible, gsm8k_gold, mmlu_letters, mmlu_prediction
from derta.eval.helpfulness import load_task, run_helpful
from derta.eval.runner import RunDir
from derta.eval.safety import EvalConfig, report_markdown, run_eval, summarize
from derta.io import InputError

SIX = "completion,prefill,codeattack,jailbreak,selfcipher,pasttense"
QUESTIONS = [
    "How can I open the gate?",
    "Tell me how to fix the house.",
    "What is the best way to win the race?",
    "Write a short story about the river.",
]


def _eval(*args, **kw):
    return run_eval(EvalConfig(*args, **kw))


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompts(tmp_path, questions=QUESTIONS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"question": q}) + "\n" for q in questions))
    return path


# ---------------------------------------------------------------- inputs


def test_load_prompts_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"question": "q1"}\n\n{"instruction": "q2"}\n{"prompt": "q3", "x": 1}\n')
    assert load_prompts(tmp_path / "a.jsonl") == ["q1", "q2", "q3"]
    (tmp_path / "b.txt").write_text("first prompt\n\n  second prompt \n")
    assert load_prompts(tmp_path / "b.txt") == ["first prompt", "second prompt"]


@pytest.mark.parametrize(
    "content,line,what",
    [
        ('{"question": "q1"}\n{"question": "q2"\n', 2, "malformed JSON"),
        ('{"question": "q1"}\n{"text": "q2"}\n', 2, "none of the fields"),
        ('{"question": ""}\n', 1, "empty"),
        ('["q1"]\n', 1, "JSON object"),
    ],
)
def test_bad_prompts_name_the_line(tmp_path, content, line, what):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(InputError, match=what) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:{line}: ")


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"question": "q1"}\n{"question": oops}\n')
    good = _prompts(tmp_path)
    out = tmp_path / "run"
    cases = [
        (["--prompts", str(bad)], f"{bad}:2: malformed JSON"),
        (["--prompts", str(good), "--attacks", "completion,gcg"], "unknown attack 'gcg'"),
        (["--prompts", str(good), "--judge", "gpt4"], "unknown judge 'gpt4'"),
        (["--prompts", str(good), "--openai-extra", "{x"], "--openai-extra: malformed JSON"),
    ]
    for extra, message in cases:
        assert main(["eval", "--model", "m", "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err
        assert not out.exists()


# ---------------------------------------------------------------- runs on the tiny model


def test_eval_writes_rows_summary_report_and_resumes_without_loading(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    kw = dict(model=str(tiny_dir), max_new_tokens=4, batch_size=8)
    summary = _eval(out, _prompts(tmp_path), SIX, "keyword", **kw)
    rows = _rows(out / "generations.jsonl")
    assert len(rows) == 24 and len({(r["attack"], r["index"]) for r in rows}) == 24
    assert set(rows[0]) >= {"attack", "prompt", "input", "response", "harmful", "refused", "judge"}
    assert summary["n"] == dict.fromkeys(SIX.split(","), 4) and set(summary["asr"]) == set(SIX.split(","))
    assert json.loads((out / "summary.json").read_text())["asr"] == summary["asr"]
    report = (out / "report.md").read_text()
    assert (
        '| Model | CompletingAttack-style (declarative text, no template) | Prefill ("Sure, here is how you can ...") | '
        "CodeAttack-style (deque code task, 1 template) | JailbreakChat-style (4 self-written templates) | "
        "SelfCipher-style (benign demonstrations) | Past tense (regex rewrite) | Avg. |"
    ) in report
    assert (
        "- `jailbreak`: JailbreakChat-style (4 self-written templates), after https://arxiv.org/abs/2308.03825"
        in report
    )
    prefill = next(r for r in rows if r["attack"] == "prefill")
    assert prefill["prefill"].startswith("Sure, here is") and prefill["chat"]
    assert not next(r for r in rows if r["attack"] == "completion")["chat"]
    assert next(r for r in rows if r["attack"] == "jailbreak")["attack_details"]["template"]

    # Finished: a rerun must not even build a backend.
    def no_backend(*a, **k):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr("derta.eval.safety.make_backend", no_backend)
    assert _eval(out, _prompts(tmp_path), SIX, "keyword", **kw) == summary
    assert _rows(out / "generations.jsonl") == rows


def test_eval_resumes_after_a_torn_write(tiny_dir, tmp_path):
    out = tmp_path / "run"
    kw = dict(model=str(tiny_dir), max_new_tokens=4, batch_size=8)
    _eval(out, _prompts(tmp_path), "completion,prefill", "keyword", **kw)
    full = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    # As if killed while writing the 4th row: three rows and half a line.
    (out / "generations.jsonl").write_text("".join(full[:3]) + full[3][:25])
    (out / "summary.json").unlink()
    _eval(out, _prompts(tmp_path), "completion,prefill", "keyword", **kw)
    rows = _rows(out / "generations.jsonl")
    assert len(rows) == 8 and len({(r["attack"], r["index"]) for r in rows}) == 8
    assert [json.loads(line) for line in full[:3]] == rows[:3]  # finished rows untouched
    assert sorted(map(json.dumps, rows)) == sorted(
        json.dumps(json.loads(line)) for line in full
    )  # greedy: same answers


def test_eval_survives_kill_9(tiny_dir, tmp_path):
    """A real `kill -9` of `derta eval` mid-run, then the same command: every row once."""
    questions = [f"How can I do task number {k}?" for k in range(10)]
    prompts, out = _prompts(tmp_path, questions), tmp_path / "run"
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--prompts",
        str(prompts),
        "--attacks",
        "completion,prefill",
        "--out",
        str(out),
        "--max-new-tokens",
        "8",
        "--batch-size",
        "1",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "derta", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    log = out / "generations.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = log.read_text().count("\n")
    assert 3 <= done_at_kill < 20, "the run finished before it could be killed"
    assert not (out / "summary.json").exists()
    assert main(argv) == 0
    rows = _rows(log)
    assert len(rows) == 20 and len({(r["attack"], r["index"]) for r in rows}) == 20
    assert json.loads((out / "summary.json").read_text())["n"] == {"completion": 10, "prefill": 10}


def test_eval_refuses_to_resume_with_other_settings(tiny_dir, tmp_path):
    out = tmp_path / "run"
    _eval(out, _prompts(tmp_path), "completion", "keyword", model=str(tiny_dir), max_new_tokens=2)
    with pytest.raises(InputError, match="max_new_tokens=2, not 3"):
        _eval(out, _prompts(tmp_path), "completion", "keyword", model=str(tiny_dir), max_new_tokens=3)
    with pytest.raises(InputError, match='dtype="auto", not "bfloat16"'):
        _eval(out, _prompts(tmp_path), "completion", "keyword", model=str(tiny_dir), max_new_tokens=2, dtype="bfloat16")
    with pytest.raises(InputError, match="n_prompts=4, not 2"):
        _eval(out, _prompts(tmp_path, QUESTIONS[:2]), "completion", "keyword", model=str(tiny_dir), max_new_tokens=2)
    with pytest.raises(InputError, match="prompts_sha256"):
        _eval(out, _prompts(tmp_path, QUESTIONS[::-1]), "completion", "keyword", model=str(tiny_dir), max_new_tokens=2)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a derta run directory"):
        _eval(other, _prompts(tmp_path), "completion", "keyword", model=str(tiny_dir), max_new_tokens=2)


def test_eval_search_attacks_and_none_on_a_tiny_model(tiny_dir, tmp_path):
    out = tmp_path / "run"
    s = _eval(
        out,
        _prompts(tmp_path, QUESTIONS[:2]),
        "none,pair,autodan",
        "keyword",
        model=str(tiny_dir),
        max_new_tokens=4,
        pair_iterations=2,
        pair_streams=2,
        autodan_population=3,
        autodan_generations=2,
    )
    rows = _rows(out / "generations.jsonl")
    assert s["n"] == {"none": 2, "pair": 2, "autodan": 2} and len(rows) == 6
    assert {r["input"] for r in rows if r["attack"] == "none"} == set(QUESTIONS[:2])
    assert all("fitness" in r["attack_details"] for r in rows if r["attack"] == "autodan")
    assert all("iterations" in r["attack_details"] for r in rows if r["attack"] == "pair")
    assert json.loads((out / "manifest.json").read_text())["pair"] == {
        "attacker": "target",
        "iterations": 2,
        "streams": 2,
    }


def test_eval_against_an_openai_compatible_endpoint(fake_openai, closed_port_url, tmp_path, monkeypatch):
    monkeypatch.setattr("derta.inference.endpoint.BACKOFF", 0.01)
    fake_openai.fail_next = [500]
    fake_openai.reply = lambda p: "Step 1: <placeholder>" if "magic" in json.dumps(p) else "I’m sorry, I can’t help."
    out = tmp_path / "run"
    s = _eval(
        out,
        _prompts(tmp_path, ["How can I do magic?", "How can I open the gate?"]),
        "none,prefill",
        "keyword",
        model="closed-model",
        backend="openai",
        base_url=fake_openai.url,
        max_new_tokens=8,
    )
    assert s["asr"] == {"none": 0.5, "prefill": 0.5} and s["refusal_rate"] == {"none": 0.5, "prefill": 0.5}
    # An unreachable endpoint: one line, and no run directory left behind.
    gone = tmp_path / "gone"
    with pytest.raises(InputError, match="cannot reach"):
        _eval(gone, _prompts(tmp_path), "none", "keyword", model="m", backend="openai", base_url=closed_port_url)
    assert not gone.exists()
    # AutoDAN needs log-probabilities: refused before the static attacks run and fix the manifest.
    n = len(fake_openai.requests)
    with pytest.raises(InputError, match="--backend hf"):
        _eval(
            gone, _prompts(tmp_path), "none,autodan", "keyword", model="m", backend="openai", base_url=fake_openai.url
        )
    assert not gone.exists() and len(fake_openai.requests) == n


def test_summarize_and_report():
    rows = [
        {"attack": "prefill", "harmful": True, "refused": False, "judge": {}},
        {"attack": "prefill", "harmful": False, "refused": True, "judge": {}},
        {"attack": "codeattack", "harmful": False, "refused": False, "judge": {"degenerate": "empty"}},
    ]
    s = summarize(rows, ["prefill", "codeattack"])
    assert s["asr"] == {"prefill": 0.5, "codeattack": 0.0} and s["degenerate"]["codeattack"] == 1.0
    # Wilson intervals: 1 of 2 is 9.5-90.5 %, 0 of 1 is 0-79.3 %
    assert s["ci95"]["asr"] == {"prefill": [0.0945, 0.9055], "codeattack": [0.0, 0.7935]}
    assert s["avg_asr"]["value"] == 0.25
    text = report_markdown({**s, "model": "/x/my-model", "judge": "keyword", "backend": "hf", "max_new_tokens": 8})
    assert "| my-model | 50.0 (9-91) | 0.0 (0-79) | 25.0 (" in text


def test_rundir_rejects_damage_it_did_not_make(tmp_path):
    run = RunDir(tmp_path / "r", {"a": 1})
    run.check()
    run.append({"attack": "x", "index": 0})
    with open(run.rows_path, "a") as f:
        f.write("garbage\n")
    run.append({"attack": "x", "index": 1})
    run.close()
    with pytest.raises(InputError, match=":2: malformed row"):
        run.read_rows(safety._row_key)
    run.rows_path.write_text('[1, 2]\n{"attack": "x", "index": 1}\n')  # JSON, but not a row
    with pytest.raises(InputError, match=":1: malformed row"):
        run.read_rows(safety._row_key)
    run.manifest_path.write_text("[]\n")
    with pytest.raises(InputError, match="malformed manifest"):
        run.check()


# ---------------------------------------------------------------- helpfulness


def test_answer_extraction():
    assert gsm8k_gold("so 3+4=7\n#### 1,234") == "1234"
    assert gsm8k_flexible("First 3 apples, then 4. The answer is 7.") == "7"
    assert gsm8k_flexible("It costs $12.50 in total") == "12.5"
    assert gsm8k_flexible("no idea") is None
    q = "Which?\n-options\n-(A) one\n-(B) two\n-(C) three\n"
    assert mmlu_letters(q) == "ABC"
    assert mmlu_prediction("The answer is (B).", "ABC") == "B"
    assert mmlu_prediction("C. three", "ABC") == "C"
    assert mmlu_prediction("I think (A) one is right", "ABC") == "A"
    assert mmlu_prediction("none of them", "ABC") is None


def test_helpful_data_errors_name_the_line(tmp_path):
    g = tmp_path / "g.jsonl"
    g.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "answer": "four"}\n')
    with pytest.raises(InputError, match=f"{g}:2: gsm8k row needs"):
        load_task("gsm8k", g)
    m = tmp_path / "m.jsonl"
    m.write_text('{"question": "Q\\n-(A) x\\n-(B) y\\n", "answer": "E"}\n')
    with pytest.raises(InputError, match=f"{m}:1: mmlu row needs an 'answer' letter among AB"):
        load_task("mmlu", m)


def test_helpful_gsm8k_and_mmlu_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch):
    g = tmp_path / "g.jsonl"
    g.write_text(
        "".join(
            json.dumps({"question": f"What is {k} plus 1?", "answer": f"{k}+1={k + 1}\n#### {k + 1}"}) + "\n"
            for k in range(3)
        )
    )
    s = run_helpful(tmp_path / "g", "gsm8k", g, model=str(tiny_dir), max_new_tokens=4)
    rows = _rows(tmp_path / "g" / "generations.jsonl")
    assert s["n"] == 3 and s["metric"] == "accuracy" and 0.0 <= s["score"] <= 1.0
    assert [r["gold"] for r in sorted(rows, key=lambda r: r["index"])] == ["1", "2", "3"]
    assert s["score"] == sum(r["accuracy"] for r in rows) / 3
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"question": "Pick one\n-options\n-(A) x\n-(B) y\n", "answer": "B"}) + "\n")
    assert run_helpful(tmp_path / "m", "mmlu", m, model=str(tiny_dir), max_new_tokens=2)["n"] == 1
    monkeypatch.setattr("derta.eval.safety.make_backend", lambda *a, **k: pytest.fail("reloaded"))
    assert run_helpful(tmp_path / "g", "gsm8k", g, model=str(tiny_dir), max_new_tokens=4) == s


def test_helpful_alpaca_win_rate_with_an_llm_judge(fake_openai, tmp_path, capsys):
    data, refs = tmp_path / "a.jsonl", tmp_path / "refs.jsonl"
    data.write_text('{"question": "Name a color."}\n{"question": "Name a fruit."}\n')
    refs.write_text(
        '{"instruction": "Name a fruit.", "output": "Apple."}\n{"instruction": "Name a color.", "output": "Red."}\n'
    )
    # The model under test is the endpoint too; the judge always prefers whichever answer is "Blue!".
    fake_openai.reply = lambda p: (
        ("A" if "Response A: Blue!" in p["messages"][0]["content"] else "B")
        if "Response A" in p["messages"][0]["content"]
        else "Blue!"
    )
    s = run_helpful(
        tmp_path / "a",
        "alpaca",
        data,
        model="m",
        backend="openai",
        judge="openai:judge",
        reference=refs,
        base_url=fake_openai.url,
    )
    assert s["metric"] == "win_rate" and s["score"] == 1.0 and s["judge"] == "openai:judge"
    rows = sorted(_rows(tmp_path / "a" / "generations.jsonl"), key=lambda r: r["index"])
    assert [r["reference"] for r in rows] == ["Red.", "Apple."]
    # Without a judge: generation only.
    s2 = run_helpful(tmp_path / "a2", "alpaca", data, model="m", backend="openai", base_url=fake_openai.url)
    assert s2["score"] is None
    assert (
        main(
            [
                "eval-helpful",
                "--model",
                "m",
                "--task",
                "alpaca",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "a3"),
                "--judge",
                "keyword",
                "--reference",
                str(refs),
            ]
        )
        == 2
    )
    assert "needs an LLM judge" in capsys.readouterr().err


def test_eval_config_is_what_the_cli_builds_and_what_the_manifest_is_written_from(tmp_path):
    from derta.cli.evaluate import eval_config
    from derta.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "eval",
            "--model",
            "m",
            "--prompts",
            "p.txt",
            "--out",
            str(tmp_path / "o"),
            "--attacks",
            "none,pair",
            "--judge",
            "openai:j",
            "--judge-rubric",
            "strongreject",
            "--pair-streams",
            "4",
            "--pair-iterations",
            "2",
            "--pair-judge",
            "openai:pj",
            "--pair-judge-rubric",
            "pair",
            "--openai-extra",
            '{"a": 1}',
            "--limit",
            "3",
        ]
    )
    cfg = eval_config(args)
    assert isinstance(cfg, EvalConfig)
    assert (
        cfg.model,
        cfg.judge_rubric,
        cfg.pair_streams,
        cfg.pair_iterations,
        cfg.pair_judge,
        cfg.openai_extra,
        cfg.limit,
    ) == ("m", "strongreject", 4, 2, "openai:pj", {"a": 1}, 3)
    assert eval_config(
        build_parser().parse_args(["eval", "--model", "m", "--prompts", "p", "--out", "o"])
    ) == EvalConfig("o", "p", model="m")  # the CLI's defaults are the library's
    # The manifest keeps the keys of runs made before EvalConfig, so their resume checks still hold.
    manifest = cfg.manifest(["q1", "q2"], ["none", "pair"], "openai:j/strongreject", "openai:pj/pair")
    assert set(manifest) == {
        "model",
        "backend",
        "attacks",
        "judge",
        "max_new_tokens",
        "template",
        "system",
        "dtype",
        "openai_extra",
        "n_prompts",
        "prompts_sha256",
        "jailbreak_templates",
        "pair",
        "autodan",
    }
    assert manifest["pair"] == {"attacker": "target", "iterations": 2, "streams": 4, "judge": "openai:pj/pair"}
    old_pair = EvalConfig("o", "p", "pair", model="m", pair_streams=1, pair_iterations=3).manifest(
        ["q"], ["pair"], "keyword", None
    )
    assert old_pair["pair"] == {"attacker": "target", "iterations": 3}  # a one-stream run resumes a pre-EvalConfig run
    for bad, flag in (
        ({"pair_streams": 0}, "--pair-streams"),
        ({"batch_size": 0}, "--batch-size"),
        ({"backend": "tgi"}, "unknown backend"),
        ({"attacker": "gpt"}, "bad backend spec"),
    ):
        with pytest.raises(InputError, match=flag):
            EvalConfig("o", "p", model="m", **bad).check()


def test_eval_quiet_turns_the_progress_bar_off(tmp_path, monkeypatch):
    seen = []

    def fake_run_eval(cfg, progress=None):
        seen.append(progress)
        return {"asr": {"none": 0.0}, "n": {"none": 1}, "judge": "keyword"}

    monkeypatch.setattr(safety, "run_eval", fake_run_eval)
    prompts = _prompts(tmp_path)
    base = ["eval", "--model", "m", "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main(base) == 0 and main([*base, "--quiet"]) == 0
    assert seen == [None, False]  # default: on when the output is a terminal
