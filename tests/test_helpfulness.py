"""Helpfulness scoring as lm-evaluation-harness does it: strict GSM8K/MMLU extraction, stop sequences, `derta score`."""

import json

import pytest

from derta.cli.main import main
from derta.eval.answers import (
    gsm8k_flexible,
    gsm8k_strict,
    mmlu_prediction,
    score_file,
    truncate_at_stops,
)
from derta.eval.helpfulness import format_prompt
from derta.io import InputError

# ---------------------------------------------------------------- MMLU: each mis-score reported in issue 10


@pytest.mark.parametrize(
    "response,expected",
    [
        # "answer is a" (case-insensitive) used to score A
        ("The answer is a bit subtle: both look right, but only one fits the definition, so (C).", "C"),
        # a leading article used to score A
        ("A monopolist sets price above marginal cost, so the inefficiency option is right: (C)", "C"),
        ("A good way to see it is to rule out the others.", None),
        # the first parenthesized letter used to win
        ("Option (A) is wrong because demand shifts, the correct option is (C).", "C"),
        # a bare letter in prose used to win: strict parsing does not guess
        ("I think B is plausible but on reflection D fits better.", None),
    ],
)
def test_mmlu_issue_cases(response, expected):
    assert mmlu_prediction(response, "ABCD") == expected


@pytest.mark.parametrize(
    "response,expected",
    [
        ("The answer is (B).", "B"),
        ("the answer is B.", "B"),
        ("Answer: D", "D"),
        ("The correct answer is: (A)", "A"),
        ("The correct choice is C because ...", "C"),
        ("B", "B"),
        (" (D)", "D"),
        ("C. three", "C"),
        ("A) one", "A"),
        ("(B) Mary's score is 8% higher than Pam's.", "B"),
        ("I think (A) one is right", "A"),
        ("Both (A) and (B) have merits.", None),
        ("none of them", None),
        ("", None),
        # the first statement counts, and nothing after a stop sequence
        ("The answer is (B).\n\nQuestion: next one?\nThe answer is (D).", "B"),
        ("Let me think.\nQuestion: something else -(A) x\nAnswer: A", None),
    ],
)
def test_mmlu_strict_parse(response, expected):
    assert mmlu_prediction(response, "ABCD") == expected


def test_mmlu_letters_outside_the_options_are_ignored():
    assert mmlu_prediction("The answer is (E).", "ABCD") is None
    assert mmlu_prediction("The answer is (E).", "ABCDE") == "E"


# ---------------------------------------------------------------- GSM8K


def test_gsm8k_first_strict_match_and_stop_sequence():
    # a continued fake question used to win with the last "####"
    response = "He pays 3 * 6 = 18.\n#### 18\n\nQuestion: Another one?\nAnswer: 1 + 2 = 3\n#### 3"
    assert gsm8k_strict(response) == "18"
    assert gsm8k_flexible(response) == "18"  # the flexible match, too, stops at "Question:"
    assert gsm8k_strict("#### 18 then #### 3") == "18"
    assert truncate_at_stops("a Question: b</s>") == "a " and truncate_at_stops("abc") == "abc"


def test_gsm8k_flexible_is_a_separate_fallback():
    response = "First 3 apples, then 4 more, so 7 in all."
    assert gsm8k_strict(response) is None and gsm8k_flexible(response) == "7"
    assert gsm8k_flexible("It costs $1,234.50 in total") == "1234.5"
    assert gsm8k_strict("#### -5") == "-5"


@pytest.mark.parametrize(
    "response,strict,flexible",
    [
        # "#### N" first, whatever follows it
        ("She has 3 + 4 = 7.\n#### 7\nHope this helps with your 2 kids!", "7", "7"),
        ("The answer is 9.\n#### 8", "8", "8"),
        # then an explicit statement, even with text after it (lm-eval's cot regex wants "N." right after)
        ("So the answer is 18 dollars, and she keeps 2 for later.", "18", "18"),
        ("The final answer is: **$1,250**. Let me know if you have 3 more questions!", "1250", "1250"),
        ("The answer is 2,400 km/h because 40 * 60 = 2400.", "2400", "2400"),
        ("Thus the answer is 0.5 hours, i.e. 30 minutes.", "0.5", "0.5"),
        ("the answer is -12 degrees, colder than the 4 degrees of yesterday", "-12", "-12"),
        # then the last number, units and thousands separators dropped
        ("He walks 3 km a day for 1,000 days, so 3,000 km in total.", None, "3000"),
        ("Each box costs $4.25, so 4 boxes cost $17.00", None, "17"),
        ("The total is 45 apples.\n\nQuestion: How many pears?\nThe answer is 6.", None, "45"),
        ("The answer is not obvious: 12 rows of 5 seats make 60 seats.", None, "60"),
        ("I don't know.", None, None),
    ],
)
def test_gsm8k_follows_lm_eval_filters_in_order(response, strict, flexible):
    assert gsm8k_strict(response) == strict and gsm8k_flexible(response) == flexible


def test_paper_prompt_formats():
    assert format_prompt("mmlu", "Q?", "plain") == "Q?"
    assert (
        format_prompt("mmlu", "Q?", "paper")
        == "Choose the correct option for the given question.\n\n\n\nQuestion: Q?\n"
    )
    assert format_prompt("gsm8k", "Q?", "paper") == "\n Q? \n "
    with pytest.raises(InputError, match="unknown prompt format"):
        format_prompt("mmlu", "Q?", "fewshot")


def test_paper_mmlu_file_golds_are_parsed_by_the_same_rules(tmp_path):
    """The paper's MMLU rows put the options in the question; a response quoting the gold option scores it."""
    q = "Which is true?\n-options\n-(A) one\n-(B) two\n-(C) three\n"
    assert mmlu_prediction("The answer is (C) three.", "ABC") == "C"
    assert (
        score_file(
            "mmlu",
            _write(tmp_path / "r.jsonl", [{"question": q, "response": "(C) three", "answer": "C"}]),
            tmp_path / "o.jsonl",
        )["accuracy"]
        == 1.0
    )


# ---------------------------------------------------------------- derta score


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_score_gsm8k(tmp_path, capsys):
    src = _write(
        tmp_path / "r.jsonl",
        [
            {"response": "6 * 3 = 18\n#### 18\nQuestion: more?\n#### 3", "answer": "3 * 6 = 18\n#### 18"},
            {"response": "So the total is 42.", "answer": 42},
            {"response": "#### 7", "gold": "8"},
            {"response": "no number here"},
        ],
    )
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--task", "gsm8k", "--in", str(src), "--out", str(out)]) == 0
    rows = _read(out)
    assert [r["extracted"] for r in rows] == ["18", None, "7", None]
    assert [r["extracted_flexible"] for r in rows] == ["18", "42", "7", None]
    assert [r.get("correct") for r in rows] == [True, False, False, None]
    assert [r.get("correct_flexible") for r in rows] == [True, True, False, None]
    printed = capsys.readouterr().out
    assert "accuracy 33.3% (3 rows with gold) strict match; flexible match 66.7%" in printed


def test_score_mmlu_without_gold(tmp_path, capsys):
    src = _write(tmp_path / "r.jsonl", [{"response": "The answer is (B)."}, {"response": "A good question."}])
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--task", "mmlu", "--in", str(src), "--out", str(out)]) == 0
    assert [r["extracted"] for r in _read(out)] == ["B", None] and "correct" not in _read(out)[0]
    assert "no gold answers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "task,rows,message",
    [
        ("gsm8k", [{"response": "1"}, {"answer": "#### 1"}], "row is missing field 'response'"),
        ("gsm8k", [{"response": "1"}, {"response": "1", "answer": "about twelve"}], "'answer' must be a number"),
        (
            "mmlu",
            [{"response": "(A)", "answer": "A"}, {"response": "(A)", "answer": "E"}],
            "'answer' must be one option letter",
        ),
        ("mmlu", [{"response": "(A)"}, {"response": 3}], "field 'response' must be a string"),
    ],
)
def test_score_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, task, rows, message):
    src = _write(tmp_path / "r.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--task", task, "--in", str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{src}:2:" in err and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == [src]


def test_score_missing_file(tmp_path, capsys):
    assert main(["score", "--task", "mmlu", "--in", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---------------------------------------------------------------- MMLU by answer-letter log-likelihood


def test_mmlu_loglik_matches_a_manual_forward_pass(tiny_dir, tmp_path):
    import torch

    from derta.eval.helpfulness import MMLU_ANSWER_PREFIX, mmlu_loglik, run_helpful
    from derta.inference.base import GenInput
    from derta.inference.hf import HFBackend
    from derta.models.templates import encode_text

    backend = HFBackend(str(tiny_dir), batch_size=2, max_new_tokens=2)
    q = "Pick one\n-options\n-(A) x\n-(B) y\n-(C) z\n"
    [(pred, scores)] = mmlu_loglik(backend, [q])
    assert set(scores) == {"A", "B", "C"} and pred == max(scores, key=scores.get)
    prompt = backend.encode(GenInput(q, prefill=MMLU_ANSWER_PREFIX))
    for letter in "ABC":
        cont = encode_text(backend.tokenizer, letter)
        with torch.no_grad():
            logits = backend.model(torch.tensor([prompt + cont])).logits[0].float()
        expected = sum(float(torch.log_softmax(logits[len(prompt) - 1 + k], -1)[t]) for k, t in enumerate(cont))
        assert abs(scores[letter] - expected) < 1e-3
    # through eval-helpful's run: no generation, one row per question with every letter's log-probability
    data = _write(
        tmp_path / "m.jsonl", [{"question": q, "answer": pred}, {"question": q, "answer": "A" if pred != "A" else "B"}]
    )
    s = run_helpful(tmp_path / "run", "mmlu", data, model=str(tiny_dir), mmlu_method="loglik")
    assert s["score"] == 0.5
    rows = _read(tmp_path / "run" / "generations.jsonl")
    assert all(r["response"] is None and set(r["logprobs"]) == {"A", "B", "C"} for r in rows)
    with pytest.raises(InputError, match="log-likelihood scoring is for --task mmlu"):
        run_helpful(
            tmp_path / "run2",
            "gsm8k",
            _write(tmp_path / "g.jsonl", [{"question": "q", "answer": "#### 1"}]),
            model=str(tiny_dir),
            mmlu_method="loglik",
        )
