"""Self-distilled anchors: the built-in prompts, the drop rules, a resumable run on the tiny model."""

import json

from derta.cli.main import main
from derta.data.distill import BENIGN_PROMPTS, HELDOUT_OVERREFUSAL, builtin_prompts, drop_reason, run_distill
from derta.io import read_jsonl


def test_builtin_prompts_are_many_varied_and_apart_from_the_heldout_set():
    rows = read_jsonl(BENIGN_PROMPTS, required=("prompt", "category"))
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) >= 500 and len(set(prompts)) == len(prompts) == len(builtin_prompts())
    lookalikes = [r for r in rows if r["category"] == "lookalike"]
    assert len(lookalikes) >= 150 and len({r["lookalike_kind"] for r in lookalikes}) >= 6
    assert {r["category"] for r in rows} >= {"everyday", "howto", "writing", "coding", "facts", "lookalike"}
    heldout = read_jsonl(HELDOUT_OVERREFUSAL, required=("prompt", "label"))
    assert {r["label"] for r in heldout} == {"safe", "unsafe"}
    assert not {r["prompt"].lower() for r in heldout} & {p.lower() for p in prompts}


def test_refusals_loops_and_cut_answers_are_dropped():
    assert drop_reason("Sorry, I can't help with that.", 8, 128) == "refusal"
    assert drop_reason("the the the the the the the the the", 9, 128) == "degenerate"
    assert drop_reason("Preheat the oven and mix the flour with", 128, 128) == "truncated"
    assert drop_reason("Preheat the oven and mix the flour.", 128, 128) is None  # at the cap but finished
    assert drop_reason("Paris is the capital of France", 7, 128) is None  # stopped by itself


def test_trim_keeps_finished_sentences_of_a_cut_answer():
    from derta.data.distill import trim_to_sentence

    assert trim_to_sentence("Paris is the capital. It has many muse") == "Paris is the capital."
    assert trim_to_sentence("One long unfinished sentence without an end") is None


def test_distil_on_tiny_model_resumes_without_loss_or_doubling(tiny_dir, tmp_path):
    prompts = builtin_prompts()[:6]
    out = tmp_path / "anchors.jsonl"
    # an interrupted run: the log holds two finished prompts and a torn line
    first = run_distill(
        str(tiny_dir),
        prompts[:2],
        tmp_path / "first.jsonl",
        max_new_tokens=6,
        batch_size=4,
        progress=False,
        allow_empty=True,
    )
    parts = tmp_path / "anchors.jsonl.parts"
    parts.mkdir()
    full_settings = dict(first, n_prompts=6)
    from derta.eval.runner import text_sha256

    manifest = {k: full_settings[k] for k in ("model", "n_prompts", "max_new_tokens", "decoding", "template")}
    manifest["prompts_sha256"] = text_sha256(prompts)
    (parts / "manifest.json").write_text(json.dumps(manifest))
    (parts / "generations.jsonl").write_text(
        json.dumps({"index": 0, "prompt": prompts[0], "response": "A finished answer.", "n_tokens": 3})
        + "\n"
        + '{"index": 1, "pro'
    )
    s = run_distill(str(tiny_dir), prompts, out, max_new_tokens=6, batch_size=4, progress=False)
    assert s["resumed_from"] == 1 and s["kept"] + sum(s["dropped"].values()) == 6
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == s["kept"] and rows[0] == {"instruction": prompts[0], "response": "A finished answer."}
    assert json.loads((tmp_path / "anchors.distill.json").read_text())["kept"] == s["kept"]
    assert len((parts / "generations.jsonl").read_text().splitlines()) == 6  # the raw log, each prompt once
    # a rerun with the same settings does nothing and returns the same summary
    assert run_distill(str(tiny_dir), prompts, out, max_new_tokens=6, batch_size=4, progress=False) == s


def test_cli_distill_that_keeps_nothing_says_why_then_feeds_data_build(tiny_dir, tmp_path, synthetic, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "Say hello."]))
    out = tmp_path / "a.jsonl"
    argv = ["data", "distill", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out)]
    # the random tiny model's answers are all dropped: one line with the counts and the fix, and no empty file
    assert main([*argv, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "kept none of 2 responses" in err and "--template" in err
    assert not out.exists()
    # the same run resumed with finished answers in its log writes rows data build takes
    log = tmp_path / "a.jsonl.parts" / "generations.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    log.write_text("".join(json.dumps({**r, "response": "Apples are fruit.", "n_tokens": 3}) + "\n" for r in rows))
    assert main([*argv, "--max-new-tokens", "4"]) == 0
    assert "kept 2 of 2" in capsys.readouterr().out
    safety = tmp_path / "safety.jsonl"
    safety.write_text("".join(json.dumps(t) + "\n" for t in synthetic.harmful_train[:4]))
    build = ["data", "build", "--recipe", "derta", "--safety", str(safety), "--helpful", str(out)]
    assert main([*build, "--out", str(tmp_path / "rows.jsonl")]) == 0


def test_cli_bad_prompts_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": 3}) + "\n")
    assert (
        main(["data", "distill", "--model", "nowhere", "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{bad}:2" in err and not (tmp_path / "o.jsonl").exists()


def test_cli_distill_cpu_bf16_is_part_of_the_run(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["Name a fruit.", "Say hello."]))
    out = tmp_path / "a.jsonl"
    argv = ["data", "distill", "--model", str(tiny_dir), "--prompts", str(prompts), "--out", str(out)]
    argv += ["--max-new-tokens", "4"]
    assert main([*argv, "--cpu-bf16", "on"]) == 2  # the random model's answers are dropped; the run is kept
    manifest = json.loads((tmp_path / "a.jsonl.parts" / "manifest.json").read_text())
    assert manifest["cpu_bf16"] is True
    capsys.readouterr()
    # Resuming it in float32 would mix the two precisions' answers: refused, naming the setting.
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cpu_bf16=true" in err and "--restart" in err
