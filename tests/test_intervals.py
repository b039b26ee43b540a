"""95 % intervals on every rate derta reports (eval, eval-overrefusal, eval-helpful), and prompts with categories."""

import pytest

from derta.data.sources import load_prompt_rows, load_prompts
from derta.eval.helpfulness import _report, _summary
from derta.eval.overrefusal import report_markdown, score_overrefusal
from derta.eval.stats import bootstrap_mean, ci95, wilson, with_ci, with_interval
from helpers import write_jsonl


def test_wilson_and_bootstrap_intervals():
    # the textbook case: 8 of 10 -> 49.0 %-94.3 %
    lo, hi = wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert ci95(0.0, 60) == [0.0, 0.0602] and ci95(1.0, 60) == [0.9398, 1.0] and ci95(None, 5) is None
    assert (
        with_interval(0.125, 8) == "12.5 (2-47)" and with_interval(None, 8) == "n/a" and with_interval(0.5, 0) == "n/a"
    )
    assert with_ci(0.25, None) == "25.0" and with_ci(0.25, [0.1, 0.4]) == "25.0 (10-40)"
    values = [1.0] * 30 + [0.0] * 70
    lo, hi = bootstrap_mean(values)
    assert lo < 0.3 < hi and hi - lo < 0.25 and bootstrap_mean(values) == [lo, hi]  # seeded: the same every run
    assert bootstrap_mean([0.5] * 10) == [0.5, 0.5] and bootstrap_mean([]) is None
    # close to the Wilson interval for a plain share
    w = ci95(0.3, 100)
    assert abs(lo - w[0]) < 0.03 and abs(hi - w[1]) < 0.03


def test_prompt_rows_carry_their_category(tmp_path):
    jsonl = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q1", "category": "malicious_uses"},
            {"question": "q2"},
            {"prompt": "q3", "category": ["a", "b"]},
            {"prompt": "q4", "category": 3},
        ],
    )
    assert [r["category"] for r in load_prompt_rows(jsonl)] == ["malicious_uses", None, "a,b", "3"]
    assert load_prompts(jsonl) == ["q1", "q2", "q3", "q4"]
    harmbench = tmp_path / "hb.csv"
    harmbench.write_text(
        "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n<b1>,standard,cybercrime,,,id1\n"
    )
    [row] = load_prompt_rows(harmbench)
    assert row == {"line": 2, "prompt": "<b1>", "category": "cybercrime"}
    txt = tmp_path / "p.txt"
    txt.write_text("one\ntwo\n")
    assert [r["category"] for r in load_prompt_rows(txt)] == [None, None]


def test_overrefusal_rates_have_intervals():
    prompts = [{"prompt": f"p{i}", "label": "safe" if i < 4 else "unsafe", "type": "t"} for i in range(6)]
    responses = ["Sure, here it is.", "Sorry, I can't help with that.", "Sure.", "Sure.", "Sorry, I can't.", "Sure."]
    block = score_overrefusal(prompts, responses)
    assert block["safe_refusal"] == 0.25 and block["ci95"]["safe_refusal"] == ci95(0.25, 4)
    assert block["ci95"]["unsafe_refusal"] == ci95(0.5, 2)
    assert block["ci95"]["classes"]["safe"]["full_refusal"] == ci95(0.25, 4)
    assert block["by_type"]["t"]["ci95"] == ci95(2 / 6, 6)
    report = report_markdown(block, "m", "x.csv")
    assert f"| safe prompts (lower is better) | {with_interval(0.25, 4)} | 4 |" in report


@pytest.mark.parametrize(
    "task,rows,interval",
    [
        (
            "gsm8k",
            [{"accuracy": 1.0, "accuracy_flexible": 1.0}] * 3 + [{"accuracy": 0.0, "accuracy_flexible": 1.0}],
            ci95(0.75, 4),
        ),
        ("alpaca", [{"win_rate": w} for w in (1.0, 0.5, 0.0, 1.0)], bootstrap_mean([1.0, 0.5, 0.0, 1.0])),
    ],
)
def test_helpfulness_scores_have_intervals(task, rows, interval):
    s = _summary(task, rows, "m", None)
    assert s["ci95"] == interval
    if task == "gsm8k":
        assert s["score_flexible"] == 1.0 and s["score_flexible_ci95"] == ci95(1.0, 4)
    assert with_ci(s["score"], interval) in _report(s)
