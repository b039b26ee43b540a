"""The refusal-position probe: batched left-padded probabilities, the averaged curve, and the CLI."""

import json

import numpy as np
import pytest
import torch

from derta.cli.main import main
from derta.eval.probe import average_curve, refusal_probabilities
from derta.io import InputError
from derta.models.loading import load_model
from derta.models.refusal_tokens import refusal_token_ids
from derta.models.templates import encode_prompt, encode_text, format_prompt
from helpers import write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir)).eval()


def manual_probs(model, tok, instruction, response):
    """One unpadded forward pass; P(refusal) at positions len(prompt)-1 .. len(prompt)+n-1."""
    prompt = encode_prompt(tok, format_prompt(tok, instruction))
    resp = encode_text(tok, response)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + resp])).logits[0].float()
    probs = torch.softmax(logits, -1)[:, refusal_token_ids(tok)].sum(-1)
    return probs[len(prompt) - 1 : len(prompt) + len(resp)], len(resp)


def test_batched_probabilities_equal_unbatched_manual_computation(tiny_model, tiny_tokenizer, synthetic):
    pairs = [(r["instruction"], r["harmful_response"]) for r in synthetic.harmful_test[:4]]
    pairs += [(r["instruction"], r["response"]) for r in synthetic.helpful_test[:4]]  # some one-word answers
    pairs.append(("Hi", "ok"))
    lengths = {len(encode_text(tiny_tokenizer, r)) for _, r in pairs}
    assert len(lengths) >= 4, "the batch must mix response lengths"
    expected = [manual_probs(tiny_model, tiny_tokenizer, q, r) for q, r in pairs]
    tiny_model.train()
    for batch_size in (3, 16):  # several padded batches, and one batch holding everything
        got = refusal_probabilities(tiny_model, tiny_tokenizer, pairs, batch_size=batch_size)
        assert len(got) == len(pairs)
        for probs, (want, n) in zip(got, expected):
            assert len(probs) == n + 1
            assert torch.allclose(torch.tensor(probs), want, rtol=1e-4, atol=1e-9), (probs, want)
    assert tiny_model.training, "the probe restores training mode"
    tiny_model.eval()


def test_average_curve_interpolates_hand_example():
    curve = average_curve([[0.0, 1.0], [1.0, 1.0, 0.0], [0.4]], points=5)
    assert [c["position_frac"] for c in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # [0,1] -> 0 .25 .5 .75 1 ; [1,1,0] -> 1 1 1 .5 0 ; [0.4] -> constant
    want = np.mean([[0, 0.25, 0.5, 0.75, 1], [1, 1, 1, 0.5, 0], [0.4] * 5], axis=0)
    assert np.allclose([c["refusal_prob"] for c in curve], want)
    default = average_curve([[0.2, 0.4, 0.6]])
    assert len(default) >= 5 and default[0]["position_frac"] == 0.0 and default[-1]["position_frac"] == 1.0
    assert np.allclose([c["refusal_prob"] for c in default], [0.2 + 0.4 * c["position_frac"] for c in default])
    with pytest.raises(InputError, match="at least 5"):
        average_curve([[0.0, 1.0]], points=4)


def test_cli_probe_writes_json_and_png(tiny_dir, tiny_tokenizer, synthetic, tmp_path):
    rows = synthetic.harmful_test[:6]
    data = write_jsonl(tmp_path / "harmful.jsonl", rows)
    out, png = tmp_path / "probe.json", tmp_path / "probe.png"
    assert (
        main(
            [
                "probe",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--plot",
                str(png),
                "--batch-size",
                "4",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n_examples"] == 6 and result["field"] == "harmful_response"
    assert sorted(result["refusal_tokens"]) == [" Sorry", "Sorry"]  # the tokens counted, as the transition trains them
    curve = result["curve"]
    assert len(curve) >= 5 and curve[0]["position_frac"] == 0.0 and curve[-1]["position_frac"] == 1.0
    assert all(0.0 <= c["refusal_prob"] <= 1.0 for c in curve)
    per = result["per_example"]
    assert [p["instruction"] for p in per] == [r["instruction"] for r in rows]
    for p, r in zip(per, rows):
        assert len(p["refusal_probs"]) == len(encode_text(tiny_tokenizer, r["harmful_response"])) + 1
    again = average_curve([p["refusal_probs"] for p in per], points=len(curve))
    assert np.allclose([c["refusal_prob"] for c in again], [c["refusal_prob"] for c in curve], atol=1e-6)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_cli_probe_field_response_on_helpful_rows(tiny_dir, tiny_tokenizer, synthetic, tmp_path):
    rows = synthetic.helpful_test[:5]
    data = write_jsonl(tmp_path / "helpful.jsonl", rows)
    out = tmp_path / "helpful_probe.json"
    assert (
        main(
            [
                "probe",
                "--model",
                str(tiny_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--field",
                "response",
                "--points",
                "7",
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["field"] == "response" and result["n_examples"] == 5 and len(result["curve"]) == 7
    for p, r in zip(result["per_example"], rows):
        assert len(p["refusal_probs"]) == len(encode_text(tiny_tokenizer, r["response"])) + 1


def test_cli_probe_row_missing_field_names_file_and_line(tiny_dir, synthetic, tmp_path, capsys):
    rows = [dict(r) for r in synthetic.harmful_test[:3]]
    del rows[1]["harmful_response"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "bad_probe.json"
    capsys.readouterr()
    assert main(["probe", "--model", str(tiny_dir), "--data", str(data), "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"{data}:2:" in lines[0] and "harmful_response" in lines[0], lines
    assert not out.exists()
    # Too few curve points is refused up front, too.
    assert main(["probe", "--model", str(tiny_dir), "--data", str(data), "--out", str(out), "--points", "3"]) == 2
    assert "--points" in capsys.readouterr().err and not out.exists()
