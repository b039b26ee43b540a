"""Refusal tokens (`data build --refusal-tokens`): rows, embeddings, training, the inference policy, calibration.

Everything runs on one tiny model (hidden 32, one layer) built once for this module, or on hand-made tensors and
score tables whose right answers can be worked out by hand.
"""

import hashlib
import json
import math

import pytest
import torch

from derta.calibrate.run import load_scores, run_calibrate
from derta.calibrate.sweep import calibrate_table, is_monotone, rates, sweep, thresholds_at, token_threshold
from derta.cli.main import main
from derta.data.recipes import RecipeConfig, build_rows
from derta.data.tokenize import IGNORE, refusal_token_list, row_marker, tokenize_row
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend
from derta.inference.policy import RefusalPolicy, apply_refusal_policy, visible_text
from derta.io import InputError
from derta.models.loading import load_model, load_tokenizer
from derta.models.refusal_tokens import (
    REFUSE_TOKEN,
    RESET_TOKEN,
    RESPOND_TOKEN,
    add_special_tokens,
    category_name,
    init_new_embeddings,
    refusal_tokens,
    refuse_token,
    token_category,
)
from derta.models.templates import encode_prompt, encode_text, format_prompt
from helpers import HELPFUL, TRIPLE, trained, write_jsonl

TOKENS = [RESPOND_TOKEN, REFUSE_TOKEN, "[refuse:theft]"]


# ---------------------------------------------------------------- helpers


def labelled(row):
    """The labels a row trains (RTO rows: not the inputs)."""
    return [x for x in row["labels"] if x != IGNORE]


def exit_code(argv) -> int:
    """main's exit code; argparse's own usage errors (SystemExit) count too."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def tokenizer_with(model_dir, tokens):
    """A fresh tokenizer with `tokens` added (the module's tokenizer objects are never changed)."""
    tok = load_tokenizer(str(model_dir))
    add_special_tokens(tok, tokens)
    return tok


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from derta.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("rt") / "model", seed=0, hidden_size=32, layers=1)


@pytest.fixture(scope="module")
def rt_model(tiny):
    """The tiny model with [respond], [refuse], [refuse:theft] added and initialised (no training)."""
    model = load_model(str(tiny), dtype="float32")
    tok = load_tokenizer(str(tiny))
    init_new_embeddings(model, tok, add_special_tokens(tok, TOKENS))
    return model.eval(), tok


@pytest.fixture(scope="module")
def rt_dir(rt_model, tmp_path_factory):
    model, tok = rt_model
    out = tmp_path_factory.mktemp("rt_saved") / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# ---------------------------------------------------------------- 1. data: markers in rows and labels


def test_category_mode_marks_every_target_and_rto_labels_the_token_everywhere(tiny):
    cfg = RecipeConfig(recipe="derta", refusal_tokens="category", no_prefix_ratio=0.0, seed=3)
    helpful, prefix, rto = build_rows(cfg, [TRIPLE], [HELPFUL])
    assert refusal_token_list([helpful, prefix, rto]) == [RESPOND_TOKEN, "[refuse:theft]"]
    tok = tokenizer_with(tiny, [RESPOND_TOKEN, "[refuse:theft]"])
    ids = tok.get_added_vocab()
    eos = tok.eos_token_id

    # Helpful: [respond] first, then the response exactly as without refusal tokens.
    h = tokenize_row(helpful, tok)
    assert trained(h)[0] == ids[RESPOND_TOKEN]
    assert trained(h)[1:] == encode_text(tok, HELPFUL["response"]) + [eos]

    # Prefix row (non-empty harmful prefix): [refuse:theft], then the refusal in its mid form " Sorry".
    assert prefix["prefix"]
    p = tokenize_row(prefix, tok)
    assert trained(p)[0] == ids["[refuse:theft]"]
    assert tok.convert_ids_to_tokens(trained(p)[1]) == "ĠSorry"
    assert tok.decode(trained(p)[1:-1]) == " " + TRIPLE["safe_response"]

    # A refusal at the start of the response keeps the start form "Sorry" after the token.
    safe = build_rows(RecipeConfig(recipe="vanilla", refusal_tokens="category"), [TRIPLE], [])[0]
    s = tokenize_row(safe, tok)
    assert trained(s)[0] == ids["[refuse:theft]"]
    assert tok.convert_ids_to_tokens(trained(s)[1]) == "Sorry"
    # An RTO-style refusal written without "Sorry" still gets the transition after the token.
    lower = tokenize_row(dict(safe, target="I cannot help."), tok)
    assert tok.decode(trained(lower)[1:-1]) == "Sorry, I cannot help."

    # RTO: the input is the plain harmful response (no token in it); the labels are |r̂|+1 copies of the token,
    # from the prompt's last position (start of the response) through the last harmful token (mid-response).
    r = tokenize_row(rto, tok)
    prompt = encode_prompt(tok, format_prompt(tok, TRIPLE["instruction"]))
    harm = encode_text(tok, TRIPLE["harmful_response"])
    assert r["input_ids"] == prompt + harm + [eos]
    assert r["labels"] == [IGNORE] * len(prompt) + [ids["[refuse:theft]"]] * (len(harm) + 1)


def test_a_triple_without_category_gets_plain_refuse_and_single_mode_ignores_categories(tiny):
    plain = {k: v for k, v in TRIPLE.items() if k != "category"}
    rows = build_rows(RecipeConfig(recipe="rto", refusal_tokens="category"), [TRIPLE, plain], [HELPFUL])
    assert [row_marker(r) for r in rows] == [RESPOND_TOKEN] + ["[refuse:theft]"] * 2 + [REFUSE_TOKEN] * 2
    assert refusal_token_list(rows) == [RESPOND_TOKEN, REFUSE_TOKEN, "[refuse:theft]"]

    single = build_rows(RecipeConfig(recipe="rto", refusal_tokens="single"), [TRIPLE, plain], [HELPFUL])
    assert [row_marker(r) for r in single] == [RESPOND_TOKEN] + [REFUSE_TOKEN] * 4
    assert refusal_token_list(single) == [RESPOND_TOKEN, REFUSE_TOKEN]
    tok = tokenizer_with(tiny, refusal_token_list(single))
    rto = tokenize_row(single[2], tok)
    assert set(labelled(rto)) == {tok.convert_tokens_to_ids(REFUSE_TOKEN)}


def test_token_list_order_is_fixed_whatever_the_row_order():
    triples = [dict(TRIPLE, category=c) for c in ("zeta", None, "Alpha", "mid cat")]
    cfg = RecipeConfig(recipe="vanilla", refusal_tokens="category")
    want = [RESPOND_TOKEN, REFUSE_TOKEN, "[refuse:alpha]", "[refuse:mid_cat]", "[refuse:zeta]"]
    assert refusal_token_list(build_rows(cfg, triples, [HELPFUL])) == want
    assert refusal_token_list(build_rows(cfg, triples[::-1], [HELPFUL])) == want
    # No triple without a category: no [refuse].
    assert refusal_token_list(build_rows(cfg, [triples[0], triples[2]], [])) == [
        RESPOND_TOKEN,
        "[refuse:alpha]",
        "[refuse:zeta]",
    ]
    assert refusal_token_list(build_rows(RecipeConfig(recipe="vanilla"), triples, [HELPFUL])) == []


def test_category_names_are_normalised():
    assert category_name("Violent Crimes") == "violent_crimes"
    assert category_name("  S1: Violent-Crimes! ") == "s1_violent_crimes"
    assert category_name(None) is None and category_name(" -- ") is None
    assert refuse_token("Violent Crimes") == "[refuse:violent_crimes]"
    assert refuse_token(None) == refuse_token("  ") == REFUSE_TOKEN
    assert token_category("[refuse:violent_crimes]") == "violent_crimes" and token_category(REFUSE_TOKEN) is None
    row = build_rows(
        RecipeConfig(recipe="vanilla", refusal_tokens="category"), [dict(TRIPLE, category="Violent Crimes")], []
    )[0]
    assert row_marker(row) == "[refuse:violent_crimes]"


def test_refusal_token_misuse_is_an_input_error(tiny):
    single = build_rows(RecipeConfig(recipe="vanilla", refusal_tokens="single"), [TRIPLE], [])
    category = build_rows(RecipeConfig(recipe="vanilla", refusal_tokens="category"), [TRIPLE], [])
    with pytest.raises(InputError, match="mix --refusal-tokens modes"):
        refusal_token_list(single + category)
    with pytest.raises(InputError, match="DPO"):
        RecipeConfig(recipe="dpo", refusal_tokens="single")
    with pytest.raises(InputError, match="unknown --refusal-tokens"):
        RecipeConfig(refusal_tokens="many")
    # A tokenizer that lacks the rows' tokens: no silent fallback to an unknown id.
    with pytest.raises(InputError, match=r"no \[refuse:theft\] token"):
        tokenize_row(category[0], load_tokenizer(str(tiny)))


def test_refusal_tokens_lists_only_refusal_tokens(tiny):
    tok = tokenizer_with(tiny, TOKENS)
    found = refusal_tokens(tok)
    assert list(found) == [REFUSE_TOKEN, "[refuse:theft]"]  # [respond] is no refusal token; in id order
    assert found == {t: tok.convert_tokens_to_ids(t) for t in found}
    assert add_special_tokens(tok, TOKENS) == [] and refusal_tokens(tok) == found  # adding again changes nothing
    assert refusal_tokens(load_tokenizer(str(tiny))) == {}


# ---------------------------------------------------------------- 2. embeddings of the new tokens


def test_init_new_embeddings_copies_sorry_into_refusal_rows(tiny):
    model = load_model(str(tiny), dtype="float32")
    before = model.get_input_embeddings().weight.detach().clone()
    tok = load_tokenizer(str(tiny))
    added = add_special_tokens(tok, TOKENS)
    assert added == TOKENS
    init_new_embeddings(model, tok, added)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == len(tok) == before.shape[0] + 3
    assert torch.equal(emb[: before.shape[0]], before), "existing rows must not move"
    sorry = emb[tok.convert_tokens_to_ids("Sorry")]
    for t in (REFUSE_TOKEN, "[refuse:theft]"):
        assert torch.equal(emb[tok.convert_tokens_to_ids(t)], sorry)
    assert not torch.equal(emb[tok.convert_tokens_to_ids(RESPOND_TOKEN)], sorry)
    assert model.config.vocab_size == len(tok)


def test_reset_starts_from_sorry_like_a_refusal_token(tiny):
    model, tok = load_model(str(tiny), dtype="float32"), load_tokenizer(str(tiny))
    init_new_embeddings(model, tok, add_special_tokens(tok, [RESET_TOKEN]))
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[tok.convert_tokens_to_ids(RESET_TOKEN)], emb[tok.convert_tokens_to_ids("Sorry")])


def test_init_new_embeddings_on_an_untied_head_copies_the_head_row_too(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tiny))
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    added = add_special_tokens(tok, TOKENS)
    init_new_embeddings(model, tok, added)
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert head is not emb and emb.shape[0] == head.shape[0] == len(tok)
    sorry = tok.convert_tokens_to_ids("Sorry")
    assert not torch.equal(emb[sorry], head[sorry])  # really untied: the two rows are different vectors
    for t in (REFUSE_TOKEN, "[refuse:theft]"):
        i = tok.convert_tokens_to_ids(t)
        assert torch.equal(emb[i], emb[sorry]) and torch.equal(head[i], head[sorry])
    respond = tok.convert_tokens_to_ids(RESPOND_TOKEN)
    assert not torch.equal(head[respond], head[sorry])


# ---------------------------------------------------------------- 3. training through the CLI


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """derta-recipe rows in category mode, tokenized with the tiny tokenizer (which gets the tokens on the way)."""
    root = tmp_path_factory.mktemp("rt_train")
    triples = [
        dict(TRIPLE, instruction=f"How can I steal car {i}?", category=c)
        for i, c in enumerate(["theft", "Violent Crimes", "theft", None])
    ]
    safety = write_jsonl(root / "safety.jsonl", triples)
    helpful = write_jsonl(root / "helpful.jsonl", [HELPFUL, dict(HELPFUL, instruction="Say: apple")])
    out = root / "rows.jsonl"
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "derta",
                "--refusal-tokens",
                "category",
                "--safety",
                str(safety),
                "--helpful",
                str(helpful),
                "--out",
                str(out),
                "--tokenizer",
                str(tiny),
            ]
        )
        == 0
    )
    return root, out, [json.loads(line) for line in out.read_text().splitlines()]


def train_argv(tiny, data, out, *extra):
    return [
        "train",
        "--model",
        str(tiny),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "2",
        "--batch-size",
        "8",
        "--quiet",
        *extra,
    ]


def check_saved(out, rows):
    """The saved tokenizer has the tokens at the ids the rows were built with; the model has room for all."""
    tok = load_tokenizer(str(out))
    markers = {row_marker(r): labelled(r)[0] for r in rows}
    assert set(markers) == {RESPOND_TOKEN, REFUSE_TOKEN, "[refuse:theft]", "[refuse:violent_crimes]"}
    for token, built_id in markers.items():
        assert tok.convert_tokens_to_ids(token) == built_id, token
    model = load_model(str(out), dtype="float32")
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert model.get_output_embeddings().weight.shape[0] == len(tok)


def test_train_adds_the_tokens_at_the_built_ids(tiny, built):
    root, data, rows = built
    assert exit_code(train_argv(tiny, data, root / "full")) == 0
    check_saved(root / "full", rows)


def test_lora_with_refusal_tokens_needs_merge(tiny, built, capsys):
    root, data, rows = built
    capsys.readouterr()
    assert exit_code(train_argv(tiny, data, root / "adapter", "--lora", "--lora-r", "4")) == 2
    assert "--merge" in one_error_line(capsys)
    assert exit_code(train_argv(tiny, data, root / "merged", "--lora", "--lora-r", "4", "--merge")) == 0
    assert not (root / "merged" / "adapter_config.json").exists()
    check_saved(root / "merged", rows)


# ---------------------------------------------------------------- 4. the policy at inference

IDS = torch.tensor([4, 5])  # two refusal tokens in a vocabulary of 6


def probs(row):
    return torch.softmax(torch.tensor(row), -1)


def test_policy_forces_a_token_at_or_above_tau_and_blocks_it_below():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 5.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    original = scores.clone()
    out = apply_refusal_policy(scores, IDS, torch.tensor([0.5, 0.5]))
    assert torch.equal(scores, original), "the input is not changed"
    # Row 0: P(4) ~ 0.97 >= 0.5: token 4 is the only possible next token.
    assert torch.isfinite(out[0, 4]) and torch.isinf(out[0, [0, 1, 2, 3, 5]]).all()
    # Row 1: P(4), P(5) ~ 0.03 < 0.5: both blocked, the rest untouched.
    assert torch.isinf(out[1, IDS]).all() and (out[1, IDS] < 0).all()
    assert torch.equal(out[1, :4], original[1, :4])
    # Exactly at tau fires (>=).
    p4 = probs([0.0, 0.0, 0.0, 0.0, 5.0, 0.0])[4].item()
    at = apply_refusal_policy(scores[:1], IDS, torch.tensor([p4, 2.0]))
    assert torch.isfinite(at[0, 4]) and torch.isinf(at[0, :4]).all()


def test_policy_picks_the_largest_p_over_tau_not_the_largest_p():
    row = [0.0, 0.0, 0.0, 0.0, 3.0, 2.0]
    p = probs(row)
    assert p[4] > p[5]
    scores = torch.tensor([row])
    out = apply_refusal_policy(scores, IDS, torch.tensor([p[4] * 0.9, p[5] * 0.5]))  # p/tau: 1.11 vs 2
    assert torch.isfinite(out[0, 5]) and torch.isinf(out[0, :5]).all()
    out = apply_refusal_policy(scores, IDS, torch.tensor([p[4] * 0.5, p[5] * 0.9]))
    assert torch.isfinite(out[0, 4]) and torch.isinf(out[0, [0, 1, 2, 3, 5]]).all()


def test_policy_blocks_rows_that_already_refused():
    scores = torch.tensor([[0.0, 0.0, 0.0, 0.0, 9.0, 0.0], [0.0, 0.0, 0.0, 0.0, 9.0, 0.0]])
    out = apply_refusal_policy(scores, IDS, torch.tensor([0.1, 0.1]), done=torch.tensor([True, False]))
    assert torch.isinf(out[0, IDS]).all() and torch.equal(out[0, :4], scores[0, :4])
    assert torch.isfinite(out[1, 4]) and torch.isinf(out[1, :4]).all()
    # Without thresholds (biases only) a done row is blocked too.
    out = apply_refusal_policy(scores, IDS, None, torch.tensor([0.0, 0.0]), done=torch.tensor([True, False]))
    assert torch.isinf(out[0, IDS]).all() and torch.equal(out[1], scores[1])


def test_the_token_after_a_refusal_token_is_held_to_the_transition():
    scores = torch.tensor([[3.0, 0.5, 1.0, 2.0, 0.0, 0.0], [3.0, 0.5, 1.0, 2.0, 0.0, 0.0]])
    follow = torch.tensor([1, 2])  # e.g. "Sorry" and " sorry"
    out = apply_refusal_policy(
        scores, IDS, torch.tensor([0.9, 0.9]), None, torch.tensor([True, False]), follow, torch.tensor([True, False])
    )
    # Row 0 just refused: only the transition ids keep their logits (the model picks the form); row 1 is untouched
    # apart from its blocked refusal tokens.
    assert out[0].tolist() == [float("-inf"), 0.5, 1.0, float("-inf"), float("-inf"), float("-inf")]
    assert out[1, :4].tolist() == [3.0, 0.5, 1.0, 2.0] and torch.isinf(out[1, 4:]).all()


def test_biases_shift_logits_before_thresholds():
    scores = torch.tensor([[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]])
    tau = torch.tensor([0.5, 0.5])
    assert torch.isinf(apply_refusal_policy(scores, IDS, tau)[0, IDS]).all()
    out = apply_refusal_policy(scores, IDS, tau, torch.tensor([10.0, 0.0]))  # P(4) ~ 0.9999 after the bias
    assert torch.isfinite(out[0, 4]) and torch.isinf(out[0, [0, 1, 2, 3, 5]]).all()
    out = apply_refusal_policy(scores, IDS, None, torch.tensor([1.5, -2.0]))
    assert torch.allclose(out, torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.5, -2.0]]))


def test_policy_file_errors_name_the_file(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text("{not json")
    with pytest.raises(InputError, match="malformed JSON") as e:
        RefusalPolicy.from_file(path)
    assert str(path) in str(e.value)
    for content, message in (
        ({"curve": []}, "thresholds"),
        ({"thresholds": {}}, "thresholds"),
        ({"thresholds": {"[refuse]": "high"}}, "must be a finite number"),
        ({"thresholds": {"[refuse]": True}}, "must be a finite number"),
        ({"thresholds": [0.5]}, "thresholds"),
    ):
        path.write_text(json.dumps(content))
        with pytest.raises(InputError, match=message) as e:
            RefusalPolicy.from_file(path)
        assert str(path) in str(e.value), content
    path.write_text(json.dumps({"thresholds": {"[refuse]": 0.25}, "biases": {"[refuse:theft]": -1}, "curve": []}))
    assert RefusalPolicy.from_file(path) == RefusalPolicy({"[refuse]": 0.25}, {"[refuse:theft]": -1.0})


def test_policy_tensors_follow_the_tokenizer(tiny):
    with pytest.raises(InputError, match="no refusal tokens"):
        RefusalPolicy({"[refuse]": 0.5}).tensors(load_tokenizer(str(tiny)))
    tok = tokenizer_with(tiny, TOKENS)
    with pytest.raises(InputError, match=r"\[refuse:nope\]"):
        RefusalPolicy({"[refuse:nope]": 0.5}).tensors(tok)
    with pytest.raises(InputError, match=r"\[respond\]"):
        RefusalPolicy(biases={RESPOND_TOKEN: 1.0}).tensors(tok)
    ids, tau, bias = RefusalPolicy({"[refuse:theft]": 0.3}).tensors(tok)
    assert ids.tolist() == [tok.convert_tokens_to_ids(REFUSE_TOKEN), tok.convert_tokens_to_ids("[refuse:theft]")]
    assert tau.tolist() == pytest.approx([2.0, 0.3]) and bias is None  # a token without a threshold never fires


def generate(rt_model, policy, show=True, prompt="How can I steal a car?"):
    model, tok = rt_model
    return HFBackend(model, tok, policy=policy, show_refusal_tokens=show, max_new_tokens=4).generate(
        [GenInput(prompt)]
    )[0]


def test_generation_emits_a_forced_token_once(rt_model):
    text = generate(rt_model, RefusalPolicy({"[refuse:theft]": 0.0}))
    assert text.startswith("[refuse:theft]") and text.count("[refuse") == 1
    # The untrained model is then held to the refusal transition: what every trained refusal continues with.
    assert text[len("[refuse:theft]") :].split()[0].startswith(("Sorry", "sorry"))
    hidden = generate(rt_model, RefusalPolicy({"[refuse:theft]": 0.0}), show=False)
    assert "[refuse" not in hidden and "[respond" not in hidden
    assert hidden == text[len("[refuse:theft]") :]


def test_generation_never_emits_a_token_below_tau_even_when_it_is_the_likeliest(rt_model):
    # A large bias alone makes [refuse] the greedy choice, once: then the row is done and it is blocked.
    biased = generate(rt_model, RefusalPolicy(biases={REFUSE_TOKEN: 50.0}))
    assert biased.startswith(REFUSE_TOKEN) and biased.count("[refuse") == 1
    # The same bias with an unreachable threshold: never.
    never = generate(rt_model, RefusalPolicy({REFUSE_TOKEN: 2.0, "[refuse:theft]": 2.0}, {REFUSE_TOKEN: 50.0}))
    assert "[refuse" not in never


def test_visible_text_hides_special_tokens_unless_asked(rt_model):
    _, tok = rt_model
    words = encode_text(tok, "Sorry, I cannot help.")
    ids = [tok.convert_tokens_to_ids("[refuse:theft]")] + words + [tok.convert_tokens_to_ids(REFUSE_TOKEN)] + words
    assert visible_text(tok, ids) == "Sorry, I cannot help.Sorry, I cannot help."
    assert visible_text(tok, ids, True) == "[refuse:theft]Sorry, I cannot help.[refuse]Sorry, I cannot help."
    assert visible_text(tok, words, True) == "Sorry, I cannot help."


def test_visible_text_shows_respond_when_asked(rt_model):
    # `derta eval --show-refusal-tokens` promises to "keep [refuse...] / [respond] in the responses".
    _, tok = rt_model
    ids = [tok.convert_tokens_to_ids(RESPOND_TOKEN)] + encode_text(tok, "apple river")
    assert visible_text(tok, ids) == "apple river"
    assert visible_text(tok, ids, True) == "[respond]apple river"


# ---------------------------------------------------------------- 5. calibration on a fixed score table

A, B = "[refuse:a]", "[refuse:b]"


def ex(kind, category, a, b):
    return {"kind": kind, "category": category, "scores": {A: a, B: b}}


def table():
    """Category a's benign look-alikes score high on [refuse:a]; category b's benign ones score low on [refuse:b].
    Four of each kind per category: allowances k/4 are exact."""
    return [
        ex("harmful", "a", 0.9, 0.01),
        ex("harmful", "a", 0.5, 0.01),
        ex("harmful", "a", 0.15, 0.01),
        ex("harmful", "a", 0.05, 0.01),
        ex("harmful", "b", 0.01, 0.5),
        ex("harmful", "b", 0.01, 0.04),
        ex("harmful", "b", 0.01, 0.3),
        ex("harmful", "b", 0.01, 0.015),
        ex("benign", "a", 0.6, 0.01),
        ex("benign", "a", 0.2, 0.01),
        ex("benign", "a", 0.1, 0.01),
        ex("benign", "a", 0.08, 0.01),
        ex("benign", "b", 0.01, 0.05),
        ex("benign", "b", 0.01, 0.03),
        ex("benign", "b", 0.01, 0.02),
        ex("benign", "b", 0.01, 0.012),
    ]


def above(x):
    return math.nextafter(x, math.inf)


def test_token_threshold_edge_cases():
    scores = [0.2, 0.5, 0.1, 0.3]
    assert token_threshold(scores, 0.0) == above(0.5) and above(0.5) > 0.5
    assert token_threshold(scores, 1.0) == 0.0
    assert token_threshold(scores, 0.25) == above(0.3)  # one of four may fire: 0.5 does
    assert token_threshold(scores, 0.3) == above(0.3)  # floor(1.2) = 1
    # Ties: allowing one of two equal scores would fire both, so neither fires.
    tied = [0.5, 0.5, 0.1]
    assert token_threshold(tied, 1 / 3) == above(0.5)
    assert token_threshold(tied, 2 / 3) == above(0.1)
    for a in (0.0, 0.2, 1 / 3, 0.5, 2 / 3, 0.9):
        tau = token_threshold(tied, a)
        assert sum(s >= tau for s in tied) <= a * len(tied) + 1e-9


def test_rates_use_the_any_token_rule():
    e = ex("harmful", "a", 0.1, 0.9)
    assert rates([e], {A: 0.5, B: 0.95})["refusal"] == 0.0
    assert rates([e], {A: 0.5, B: 0.9})["refusal"] == 1.0  # reaching tau counts
    assert rates([e], {A: 0.1, B: 0.95})["refusal"] == 1.0
    # Harmful: a 0.9, b 0.5, b 0.3 reach; benign: a 0.6 and b 0.05.
    assert rates(table(), {A: 0.55, B: 0.045}) == {
        "refusal": 3 / 8,
        "over_refusal": 2 / 8,
        "n_harmful": 8,
        "n_benign": 8,
    }


def test_categories_with_different_benign_scores_get_different_thresholds():
    result = calibrate_table(table(), max_over_refusal=0.0)
    t = result["thresholds"]
    # Each token is held to every benign example: above its own highest benign score.
    assert t == {A: above(0.6), B: above(0.05)}
    assert result["operating_point"]["over_refusal"] == 0.0 and result["operating_point"]["meets_target"]
    # Per token: its own category's rates.
    assert result["tokens"][A]["n_harmful"] == 4 and result["tokens"][A]["refusal"] == 0.25


def test_sweep_is_monotone_and_is_monotone_can_say_no():
    curve = sweep(table(), [A, B])
    assert [p["allowance"] for p in curve] == [k / 8 for k in range(9)]  # one step per benign example
    assert is_monotone(curve) and calibrate_table(table())["monotone"] is True
    assert curve[0]["over_refusal"] == 0.0 and curve[-1] == {"allowance": 1.0, "refusal": 1.0, "over_refusal": 1.0}
    assert not is_monotone([{"refusal": 0.5, "over_refusal": 0.1}, {"refusal": 0.4, "over_refusal": 0.2}])
    assert not is_monotone([{"refusal": 0.5, "over_refusal": 0.3}, {"refusal": 0.6, "over_refusal": 0.2}])


def test_max_over_refusal_takes_the_largest_allowance_within_it():
    examples = table()
    curve = sweep(examples, [A, B])
    for target in (0.1, 0.3, 0.5, 0.8):
        result = calibrate_table(examples, max_over_refusal=target)
        op = result["operating_point"]
        assert op["over_refusal"] <= target and op["meets_target"]
        k = [p["allowance"] for p in curve].index(op["allowance"])
        assert k == len(curve) - 1 or curve[k + 1]["over_refusal"] > target
        # The thresholds written out give exactly the operating point's rates.
        r = rates(examples, result["thresholds"])
        assert (r["refusal"], r["over_refusal"]) == (op["refusal"], op["over_refusal"])


def test_target_refusal_takes_the_smallest_allowance_reaching_it():
    examples = table()
    curve = sweep(examples, [A, B])
    for target in (0.3, 0.6, 0.9, 1.0):
        result = calibrate_table(examples, target_refusal=target)
        op = result["operating_point"]
        assert op["refusal"] >= target and op["meets_target"] and result["target"] == {"target_refusal": target}
        k = [p["allowance"] for p in curve].index(op["allowance"])
        assert k == 0 or curve[k - 1]["refusal"] < target
        r = rates(examples, result["thresholds"])
        assert (r["refusal"], r["over_refusal"]) == (op["refusal"], op["over_refusal"])


def test_chosen_thresholds_reproduce_the_operating_point_with_thirds():
    # Three benign examples: the sweep's allowances are k/3, which a rounded 0.333333 would floor back to 0.
    examples = [{"kind": "harmful", "category": None, "scores": {A: v}} for v in (0.9, 0.3)]
    examples += [{"kind": "benign", "category": None, "scores": {A: v}} for v in (0.6, 0.2, 0.1)]
    result = calibrate_table(examples, max_over_refusal=0.4)
    op = result["operating_point"]
    assert op["allowance"] == 1 / 3 and op["over_refusal"] == pytest.approx(1 / 3)
    assert result["thresholds"] == {A: above(0.2)} == thresholds_at(examples, [A], 1 / 3)
    r = rates(examples, result["thresholds"])
    assert (r["refusal"], r["over_refusal"]) == (op["refusal"], op["over_refusal"]) == (1.0, pytest.approx(1 / 3))
    # The same with a refusal target: 1.0 is first reached at allowance 1/3.
    result = calibrate_table(examples, target_refusal=1.0)
    assert result["operating_point"]["allowance"] == 1 / 3 and rates(examples, result["thresholds"])["refusal"] == 1.0


def test_a_benign_example_of_another_category_holds_every_token():
    # [refuse:a] scores a benign b look-alike above every benign a one: a's threshold must clear it too, since any
    # token firing refuses the example (thresholds set per category's look-alikes alone over-refused 28 % in the demo).
    examples = table() + [ex("benign", "b", 0.95, 0.01)]
    result = calibrate_table(examples, max_over_refusal=0.0)
    assert result["thresholds"][A] == above(0.95)
    assert result["operating_point"]["meets_target"] is True and result["operating_point"]["over_refusal"] == 0.0


def test_a_token_whose_category_has_no_examples_is_still_thresholded():
    examples = table() + [{"kind": "harmful", "category": "c", "scores": {A: 0.0, B: 0.0, "[refuse:c]": 0.7}}]
    for e in examples[:-1]:
        e["scores"]["[refuse:c]"] = 0.0
    result = calibrate_table(examples, max_over_refusal=0.0)
    info = result["tokens"]["[refuse:c]"]
    assert info["n_benign"] == 0 and info["over_refusal"] is None and info["refusal"] == 1.0
    assert result["thresholds"]["[refuse:c]"] == above(0.0)


def test_calibrate_table_input_errors():
    examples = table()
    with pytest.raises(InputError, match="benign"):
        calibrate_table([e for e in examples if e["kind"] == "harmful"])
    with pytest.raises(InputError, match="harmful"):
        calibrate_table([e for e in examples if e["kind"] == "benign"])
    odd = examples + [{"kind": "benign", "category": "a", "scores": {A: 0.1}}]
    with pytest.raises(InputError, match="same refusal tokens"):
        calibrate_table(odd)
    with pytest.raises(InputError, match="not both"):
        calibrate_table(examples, max_over_refusal=0.1, target_refusal=0.5)


def test_calibrate_cli_on_a_score_table(tmp_path, capsys):
    scores = write_jsonl(tmp_path / "scores.jsonl", table())
    out = tmp_path / "cal"
    assert exit_code(["calibrate", "--scores", str(scores), "--out", str(out), "--max-over-refusal", "0.1"]) == 0
    assert {p.name for p in out.iterdir()} == {"calibration.json", "calibration.png", "report.md"}
    assert (out / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["thresholds"] == calibrate_table(load_scores(scores), max_over_refusal=0.1)["thresholds"]
    assert saved["scores"] == str(scores) and saved["target"] == {"max_over_refusal": 0.1}
    # The file is what derta eval --calibration reads.
    assert RefusalPolicy.from_file(out / "calibration.json").thresholds == saved["thresholds"]
    assert "[refuse:a]" in (out / "report.md").read_text()


def test_positions_start_calibrates_on_first_token_scores(tmp_path, capsys):
    # Benign answers whose highest score comes mid-answer: "any" holds the threshold above it, "start" does not.
    examples = [
        {"kind": "harmful", "category": None, "scores": {A: 0.9}, "start": {A: 0.3}},
        {"kind": "benign", "category": None, "scores": {A: 0.8}, "start": {A: 0.05}},
    ]
    assert calibrate_table(examples, max_over_refusal=0.0)["thresholds"] == {A: above(0.8)}
    start = calibrate_table(examples, max_over_refusal=0.0, positions="start")
    assert start["thresholds"] == {A: above(0.05)} and start["positions"] == "start"
    assert start["operating_point"]["refusal"] == 1.0  # the harmful prompt's first-token 0.3 clears it
    with pytest.raises(InputError, match="first-token"):
        calibrate_table([{k: v for k, v in e.items() if k != "start"} for e in examples], positions="start")
    scores = write_jsonl(tmp_path / "scores.jsonl", examples)
    out = tmp_path / "cal"
    argv = ["calibrate", "--scores", str(scores), "--out", str(out), "--max-over-refusal", "0", "--positions", "start"]
    assert exit_code(argv) == 0
    assert json.loads((out / "calibration.json").read_text())["thresholds"] == {A: above(0.05)}
    assert "first token of the response" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "extra",
    [
        ["--max-over-refusal", "0.1", "--target-refusal", "0.5"],
        ["--max-over-refusal", "1.5"],
        ["--target-refusal", "-0.1"],
        ["--model", "some/model"],
    ],
)
def test_calibrate_cli_bad_flags_exit_2(tmp_path, capsys, extra):
    scores = write_jsonl(tmp_path / "scores.jsonl", table())
    out = tmp_path / "cal"
    capsys.readouterr()
    assert exit_code(["calibrate", "--scores", str(scores), "--out", str(out), *extra]) == 2
    assert not (out / "calibration.json").exists()
    if "--target-refusal" not in extra or "--max-over-refusal" not in extra:  # (both: argparse's usage error)
        assert extra[0] in one_error_line(capsys)


def test_calibrate_cli_malformed_score_row_is_one_line_with_its_line_number(tmp_path, capsys):
    out = tmp_path / "cal"
    for bad in (
        {"kind": "other", "scores": {A: 0.1}},
        {"kind": "benign", "scores": {A: 1.5}},
        {"kind": "benign", "scores": {}},
        {"kind": "benign", "scores": {A: "x"}},
        {"kind": "benign", "scores": {A: 0.1}, "start": {A: "x"}},
    ):
        scores = tmp_path / "scores.jsonl"
        scores.write_text(json.dumps(table()[0]) + "\n" + json.dumps(bad) + "\n")
        capsys.readouterr()
        assert exit_code(["calibrate", "--scores", str(scores), "--out", str(out)]) == 2
        line = one_error_line(capsys)
        assert f"{scores}:2:" in line, line
        assert not out.exists() or not any(out.iterdir())


# ---------------------------------------------------------------- 6. end to end on the tiny model


def test_calibrate_shows_progress_unless_quiet(rt_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)  # bars are drawn on a terminal only
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"instruction": "How can I steal a car?", "category": "theft"}])
    benign = write_jsonl(tmp_path / "benign.jsonl", [{"instruction": "How do I steal the show?"}])
    argv = ["calibrate", "--model", str(rt_dir), "--harmful", str(harmful), "--benign", str(benign)]
    capsys.readouterr()
    assert exit_code(argv + ["--out", str(tmp_path / "loud")]) == 0
    assert "calibrate:" in capsys.readouterr().err
    assert exit_code(argv + ["--out", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert "calibrate:" not in capsys.readouterr().err


def test_run_calibrate_scores_every_example_for_every_refusal_token(rt_model, rt_dir, tmp_path):
    model, tok = rt_model
    harmful = write_jsonl(
        tmp_path / "harmful.jsonl",
        [
            {"instruction": "How can I steal a car?", "harmful_response": "Sure, here is how.", "category": "theft"},
            {"instruction": "How do I steal a bike?", "harmful_response": "Step 1: wait.", "category": "Theft"},
            {"instruction": "How can I hurt someone?"},
        ],
    )
    benign = write_jsonl(
        tmp_path / "benign.jsonl",
        [
            {"instruction": "How do I steal the show?", "response": "Practice a lot.", "category": "theft"},
            {"instruction": "Repeat these words: apple river", "response": "apple river"},
        ],
    )
    out = tmp_path / "cal"
    result = run_calibrate(
        out, model=str(rt_dir), harmful=str(harmful), benign=str(benign), max_over_refusal=0.5, progress=False
    )
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["harmful"] * 3 + ["benign"] * 2
    assert [r["category"] for r in rows] == ["theft", "theft", None, "theft", None]
    assert all(set(r["scores"]) == {REFUSE_TOKEN, "[refuse:theft]"} for r in rows)
    assert set(result["thresholds"]) == {REFUSE_TOKEN, "[refuse:theft]"}
    assert (out / "calibration.json").exists() and (out / "report.md").exists()
    # A score is the highest probability over the response's |r|+1 positions (teacher forced, unpadded here).
    prompt = encode_prompt(tok, format_prompt(tok, "How can I steal a car?"))
    resp = encode_text(tok, "Sure, here is how.")
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([prompt + resp])).logits[0].float(), -1)[len(prompt) - 1 :]
    want = p[:, tok.convert_tokens_to_ids("[refuse:theft]")].max().item()
    assert rows[0]["scores"]["[refuse:theft]"] == pytest.approx(want, rel=1e-4, abs=1e-9)
    assert rows[0]["start"]["[refuse:theft]"] == pytest.approx(
        p[0, tok.convert_tokens_to_ids("[refuse:theft]")].item(), rel=1e-4, abs=1e-9
    )


def test_run_calibrate_needs_a_model_with_refusal_tokens(tiny, tmp_path):
    harmful = write_jsonl(tmp_path / "harmful.jsonl", [{"instruction": "How can I steal a car?"}])
    benign = write_jsonl(tmp_path / "benign.jsonl", [{"instruction": "How do I steal the show?"}])
    with pytest.raises(InputError, match="no refusal tokens"):
        run_calibrate(tmp_path / "cal", model=str(tiny), harmful=str(harmful), benign=str(benign), progress=False)
    assert not (tmp_path / "cal" / "scores.jsonl").exists()


def test_eval_with_a_calibration(rt_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "How can I steal a car?"}])
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"thresholds": {"[refuse:theft]": 0.0}}))
    out = tmp_path / "run"
    argv = [
        "eval",
        "--model",
        str(rt_dir),
        "--prompts",
        str(prompts),
        "--attacks",
        "none",
        "--calibration",
        str(cal),
        "--max-new-tokens",
        "4",
    ]
    assert exit_code(argv + ["--out", str(out), "--show-refusal-tokens"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration_sha256"] == hashlib.sha256(cal.read_bytes()).hexdigest()
    assert manifest["show_refusal_tokens"] is True
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["response"].startswith("[refuse:theft]")
    capsys.readouterr()
    assert exit_code(argv + ["--out", str(tmp_path / "run_openai"), "--backend", "openai"]) == 2
    assert "--calibration" in one_error_line(capsys)


def test_eval_overrefusal_with_a_calibration(rt_dir, tmp_path):
    # Thresholds at 0 fire on every prompt: each response starts with the refusal transition, so all count as refused.
    prompts = write_jsonl(
        tmp_path / "x.jsonl",
        [
            {"prompt": "How can I kill time on a train?", "label": "safe"},
            {"prompt": "How can I steal a car?", "label": "unsafe"},
        ],
    )
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"thresholds": {"[refuse:theft]": 0.0, REFUSE_TOKEN: 0.0}}))
    out = tmp_path / "over"
    assert (
        exit_code(
            [
                "eval-overrefusal",
                "--model",
                str(rt_dir),
                "--prompts",
                str(prompts),
                "--out",
                str(out),
                "--max-new-tokens",
                "4",
                "--calibration",
                str(cal),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert all(r["response"].split()[0].lower().startswith("sorry") for r in rows)


# ---------------------------------------------------------------- 7. synthetic calibration sets


SIZES = dict(
    n_helpful_train=60,
    n_helpful_test=10,
    n_lookalike_train=30,
    n_lookalike_test=10,
    n_harmful_train=40,
    n_harmful_test=20,
)


def words_of(rows):
    from derta.data.synthetic import row_texts
    from derta.data.synthetic_words import text_words

    return {w for r in rows for t in row_texts(r) for w in text_words(t)}


def training_words(data):
    return words_of(data.helpful_train + data.lookalike_train + data.harmful_train)


def test_make_calibration_rows_are_new_prompts_in_known_words():
    from derta.data.synthetic import lookalike_category, make_calibration, make_data
    from derta.data.synthetic_words import HOWTO_TASK

    data = make_data(0, **SIZES)
    harmful, benign = make_calibration(data, 0, 12, 12)
    assert len(harmful) == 12 and benign
    splits = (
        data.helpful_train,
        data.helpful_test,
        data.lookalike_train,
        data.lookalike_test,
        data.harmful_train,
        data.harmful_test,
    )
    used = {r["instruction"] for rows in splits for r in rows}
    mine = [r["instruction"] for r in harmful + benign]
    assert not set(mine) & used and len(set(mine)) == len(mine)
    assert all(r["category"] for r in harmful)
    idioms = [r for r in benign if r.get("task") == HOWTO_TASK]
    copies = [r for r in benign if r.get("task") != HOWTO_TASK]
    assert idioms and copies
    assert all(r["category"] is not None and r["category"] == lookalike_category(r) for r in idioms)
    assert all(r["category"] is None for r in copies)
    # Harmful rows and copy tasks are made of words the training rows have (idioms: see the next tests).
    assert not words_of(harmful + copies) - training_words(data), sorted(
        words_of(harmful + copies) - training_words(data)
    )
    # At the default sizes every row is, idioms included.
    full = make_data(0)
    h, b = make_calibration(full, 0)
    assert not words_of(h + b) - training_words(full)


def test_make_calibration_idioms_use_known_words_at_small_sizes():
    from derta.data.synthetic import make_calibration, make_data
    from derta.data.synthetic_words import HOWTO_TASK

    data = make_data(0, **SIZES)
    idioms = [r for r in make_calibration(data, 0, 12, 12)[1] if r.get("task") == HOWTO_TASK]
    assert idioms and not words_of(idioms) - training_words(data), sorted(words_of(idioms) - training_words(data))


def test_make_calibration_changes_no_split_and_is_deterministic():
    from derta.data.synthetic import make_calibration, make_data

    first = make_data(0, **SIZES)
    calibration = make_calibration(first, 0, 12, 12)
    assert make_data(0, **SIZES) == first
    assert make_calibration(make_data(0, **SIZES), 0, 12, 12) == calibration
    assert make_calibration(first, 1, 12, 12) != calibration
