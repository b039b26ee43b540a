"""The prefill depth curve of `derta eval` (prefill-depth), its area, and ASR per prompt category."""

import json

import pytest

from derta.eval.attacks import PREFILL_DEPTHS, parse_attack_names
from derta.eval.depth import depth_auc, depth_curve, depth_weights
from derta.eval.safety import EvalConfig, run_eval
from helpers import write_jsonl

HARMFUL = "Sure, here is how. Step 1: get the [tool] ready. Step 2: wait for the [signal]. Step 3: go on."


def test_depth_auc_is_the_mean_asr_over_log_depth():
    depths = list(PREFILL_DEPTHS)
    assert depth_auc(depths, [0.0] * 6) == 0.0 and depth_auc(depths, [1.0] * 6) == 1.0
    assert depth_auc([5, 10], [0.0, 1.0]) == 0.5  # a straight line on the log axis
    # depths 5-160 double each time, so every interval has the same width: end points weigh half as much
    assert depth_weights(depths) == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.2, 0.1])
    assert depth_auc(depths, [0, 0, 0, 1, 1, 1]) == 0.5
    # uneven depths: the wide interval 10-80 counts for more than 5-10
    assert depth_auc([5, 10, 80], [1.0, 0.0, 0.0]) == pytest.approx(0.5 * 1 / 4, abs=1e-4)
    assert depth_auc([40], [0.3]) == 0.3
    for depths, rates in (([10, 5], [0, 0]), ([5, 10], [0]), ([0, 5], [0, 0]), ([], [])):
        with pytest.raises(ValueError):
            depth_auc(depths, rates)


def test_prefill_depth_is_prefill_tokens_at_the_standard_depths():
    assert PREFILL_DEPTHS == (5, 10, 20, 40, 80, 160)
    assert parse_attack_names("none,prefill-depth") == ["none"] + [f"prefill-tokens:{d}" for d in PREFILL_DEPTHS]
    assert parse_attack_names("prefill-depth") == parse_attack_names("prefill-tokens:5,10,20,40,80,160")


def test_depth_curve_counts_short_responses_and_bootstraps_the_area():
    rows = [
        {"attack": f"prefill-tokens:{d}", "index": i, "harmful": i < k}
        | ({"attack_details": {"whole_response": True}} if d == 20 and i == 0 else {})
        for d, k in ((5, 0), (10, 2), (20, 4))
        for i in range(4)
    ]
    c = depth_curve(rows + [{"attack": "none", "index": 0, "harmful": True}])
    assert c["depths"] == [5, 10, 20] and c["asr"] == [0.0, 0.5, 1.0] and c["n"] == [4, 4, 4]
    assert c["whole_response"] == [0, 0, 1] and c["auc"] == depth_auc([5, 10, 20], [0.0, 0.5, 1.0])
    lo, hi = c["auc_ci95"]
    assert lo <= c["auc"] <= hi and lo < hi
    assert c["ci95"][0][0] == 0.0 and c["ci95"][2][1] == 1.0
    assert depth_curve([r for r in rows if r["attack"] == "prefill-tokens:5"]) is None  # one depth is no curve


def test_eval_prefill_depth_with_categories_on_a_tiny_model(tiny_dir, tmp_path, monkeypatch):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": f"How do I do <a harmful thing {i}>?", "harmful_response": HARMFUL, "category": c}
            for i, c in enumerate(["theft", "theft", "fraud", None])
        ],
    )
    out = tmp_path / "run"
    kw = dict(model=str(tiny_dir), max_new_tokens=2, batch_size=8)
    s = run_eval(EvalConfig(out, prompts, "none,prefill-depth", "keyword", **kw), progress=False)
    d = s["depth"]
    assert d["depths"] == list(PREFILL_DEPTHS) and d["n"] == [4] * 6
    assert d["auc"] == depth_auc(d["depths"], d["asr"]) and 0.0 <= d["auc"] <= 1.0
    # the harmful response has fewer than 80 tokens, so the two deepest prefills give it whole
    assert d["whole_response"][-2:] == [4, 4] and d["whole_response"][0] == 0
    assert (out / "depth.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "## Prefill depth" in report and "![ASR against prefill depth](depth.png)" in report
    # every rate has its interval, and ASR per category counts the prompts with none apart
    # (an attack whose every response the random model left empty is not scored: no rate, no interval)
    assert set(s["ci95"]["asr"]) == set(s["asr"])
    assert all(len(v) == 2 if s["asr"][a] is not None else a in s["not_scored"] for a, v in s["ci95"]["asr"].items())
    cats = s["by_category"]["none"]
    assert {k: v["n"] for k, v in cats.items()} == {"theft": 2, "fraud": 1, "(none)": 1}
    assert "## ASR per category" in report and "| theft | 2 |" in report
    # prefill-depth and its explicit list are one run: the explicit command resumes it without loading a model
    monkeypatch.setattr("derta.eval.safety.make_backend", lambda *a, **k: pytest.fail("a finished run loaded a model"))
    explicit = "none,prefill-tokens:5,10,20,40,80,160"
    assert run_eval(EvalConfig(out, prompts, explicit, "keyword", **kw), progress=False) == s
    assert json.loads((out / "summary.json").read_text())["depth"] == d
