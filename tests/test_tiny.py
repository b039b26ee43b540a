"""`derta tiny`: a tiny random Llama model and tokenizer that load like any hub checkpoint."""

import pytest
import torch
from safetensors.torch import load_file

from derta.cli.main import main

ROUND_TRIP = [
    "Sorry, I cannot help with that.",
    "  two leading spaces, double  spaces inside,   and three",
    "line one\nline two\n\nafter a blank line\n",
    "tabs\tand\r\nwindows newlines",
    "unicode: café naïve Ünïcödé, 中文字符, Ελληνικά, emoji 🙂🚀, math ∑√∞",
    "[INST] How can I steal a car? [\\INST] Step 1: get the [tool] ready.",
    "   ",
    "trailing space ",
]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """`derta tiny --out DIR --seed N` for seeds 0 and 1, through the CLI."""
    root = tmp_path_factory.mktemp("tinycli")
    dirs = {}
    for seed in (0, 1):
        out = root / f"seed{seed}"
        assert main(["tiny", "--out", str(out), "--seed", str(seed)]) == 0
        dirs[seed] = out
    return dirs


def test_writes_a_loadable_safetensors_model(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = built[0]
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names
    assert not any(n.endswith(".bin") for n in names), names
    assert not any(n.startswith(".") for n in names), "no temp files left behind"
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tok)
    ids = tok("Sorry, I cannot help with that.", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_has_chat_template_and_single_token_refusal(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0])
    for text in ROUND_TRIP:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text, repr(text)
    assert tok.chat_template
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi  there\nfriend"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith(tok.bos_token) and "Hi  there\nfriend" in prompt and prompt.endswith("<|assistant|>\n")
    sorry = tok("Sorry", add_special_tokens=False)["input_ids"]
    space_sorry = tok(" Sorry", add_special_tokens=False)["input_ids"]
    assert len(sorry) == 1 and len(space_sorry) == 1 and sorry != space_sorry
    assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id != tok.eos_token_id


def test_same_seed_same_weights_different_seed_different(built, tiny_dir):
    # The session fixture is build_tiny(seed=0): the CLI with --seed 0 must reproduce it exactly.
    a, same, b = (load_file(d / "model.safetensors") for d in (built[0], tiny_dir, built[1]))
    assert a.keys() == same.keys() == b.keys()
    assert all(torch.equal(a[k], same[k]) for k in a)
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    # Every randomly initialised matrix differs (norm weights are all ones in both).
    assert any("embed_tokens" in k for k in differing)
    assert sum("proj" in k for k in differing) == sum("proj" in k for k in a)
    assert (built[0] / "tokenizer.json").read_text() == (built[1] / "tokenizer.json").read_text()


def test_non_empty_out_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    capsys.readouterr()
    assert main(["tiny", "--out", str(out), "--seed", "0"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("derta: error: ") and str(out) in lines[0] and "not empty" in lines[0]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert not (tmp_path / ".taken.tmp").exists()
