"""Recipes, prefix cuts and labels, checked token by token on hand-made triples."""

import json

import pytest

from derta.cli.main import main
from derta.data.recipes import RecipeConfig, build_rows, word_cut
from derta.data.tokenize import IGNORE, load_training_rows, tokenize_row
from derta.io import InputError
from derta.models.refusal_tokens import refusal_text, refusal_token_ids, refusal_transition
from derta.models.templates import encode_prompt, encode_text, format_prompt
from helpers import HELPFUL, TRIPLE, trained, write_jsonl


def test_refusal_transition_comes_from_the_tokenizer(tiny_tokenizer):
    sorry, space_sorry = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("Sorry", "ĠSorry"))
    tr = refusal_transition(tiny_tokenizer, "Sorry")
    assert (tr.start_text, tr.mid_text, tr.start_id, tr.mid_id) == ("Sorry", " Sorry", sorry, space_sorry)
    # The probe counts exactly the transition's tokens.
    assert refusal_token_ids(tiny_tokenizer, "Sorry") == sorted([sorry, space_sorry])


def test_refusal_phrase_without_a_whole_word_token_is_refused(tiny_tokenizer):
    with pytest.raises(InputError, match="no single token for 'Apologies'"):
        refusal_transition(tiny_tokenizer, "Apologies, friend")
    with pytest.raises(InputError, match="must not be empty"):
        refusal_transition(tiny_tokenizer, "  ")


def test_refusal_text_starts_with_the_transition():
    assert refusal_text("Sorry, I cannot.", " sorry") == " sorry, I cannot."
    assert refusal_text("  sorry - no.", "Sorry") == "Sorry - no."
    assert refusal_text("I cannot help with that.", " Sorry") == " Sorry, I cannot help with that."
    assert refusal_text("Sorrynot a word", "Sorry") == "Sorry, Sorrynot a word"


@pytest.mark.parametrize(
    "recipe,kinds",
    [("vanilla", ["safe"]), ("prefix", ["prefix"]), ("rto", ["safe", "rto"]), ("derta", ["prefix", "rto"])],
)
def test_rows_per_recipe(recipe, kinds):
    rows = build_rows(RecipeConfig(recipe=recipe), [TRIPLE] * 3, [HELPFUL] * 2)
    assert [r["kind"] for r in rows] == ["helpful"] * 2 + kinds * 3
    assert all(r["category"] == "theft" for r in rows if r["kind"] != "helpful")


def test_mle_labels_mask_prompt_and_prefix_and_train_safe_response_plus_eos(tiny_tokenizer):
    cfg = RecipeConfig(recipe="prefix", no_prefix_ratio=0.0, seed=3)
    row = build_rows(cfg, [TRIPLE], [])[0]
    assert row["prefix"] and TRIPLE["harmful_response"].startswith(row["prefix"])
    assert row["prefix"] == row["prefix"].rstrip(), "prefix must not end in whitespace"
    assert row["target"] == TRIPLE["safe_response"] and row["refusal_phrase"] == "Sorry"
    tok = tokenize_row(row, tiny_tokenizer)
    prompt = encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, TRIPLE["instruction"]))
    prefix = encode_text(tiny_tokenizer, row["prefix"])
    # The separator belongs to the target: the refusal's mid form " Sorry".
    target = encode_text(tiny_tokenizer, " " + row["target"])
    # The seam: input is exactly the concatenated segments, masked up to the target.
    assert tok["input_ids"] == prompt + prefix + target + [tiny_tokenizer.eos_token_id]
    assert tok["labels"][: len(prompt) + len(prefix)] == [IGNORE] * (len(prompt) + len(prefix))
    assert tok["labels"][len(prompt) + len(prefix) :] == target + [tiny_tokenizer.eos_token_id]
    # The first trained token is " Sorry" (one token), not a lone space.
    assert tiny_tokenizer.convert_ids_to_tokens(trained(tok)[0]) == "ĠSorry"
    assert tiny_tokenizer.decode(trained(tok)[:-1]) == " " + TRIPLE["safe_response"]
    assert trained(tok)[-1] == tiny_tokenizer.eos_token_id


def test_vanilla_and_helpful_labels(tiny_tokenizer):
    rows = build_rows(RecipeConfig(recipe="vanilla"), [TRIPLE], [HELPFUL])
    helpful, safe = (tokenize_row(r, tiny_tokenizer) for r in rows)
    assert tiny_tokenizer.decode(trained(helpful)[:-1]) == HELPFUL["response"]
    assert tiny_tokenizer.decode(trained(safe)[:-1]) == TRIPLE["safe_response"]
    assert tiny_tokenizer.convert_ids_to_tokens(trained(safe)[0]) == "Sorry"
    assert len(safe["input_ids"]) == len(safe["labels"])


def test_rto_labels_are_refusal_at_every_response_position(tiny_tokenizer):
    tr = refusal_transition(tiny_tokenizer)
    row = [r for r in build_rows(RecipeConfig(recipe="rto"), [TRIPLE], []) if r["kind"] == "rto"][0]
    tok = tokenize_row(row, tiny_tokenizer)
    prompt = encode_prompt(tiny_tokenizer, format_prompt(tiny_tokenizer, TRIPLE["instruction"]))
    harm = encode_text(tiny_tokenizer, TRIPLE["harmful_response"])
    assert tok["input_ids"] == prompt + harm + [tiny_tokenizer.eos_token_id]
    # The start form right after the prompt (where a refusal would begin the response), the mid form after.
    assert tok["labels"] == [IGNORE] * len(prompt) + [tr.start_id] + [tr.mid_id] * len(harm)
    # Shifted as the model sees it: logits from the prompt's last token through the last harmful token.
    shifted = tok["labels"][1:]
    predicting = [i for i, x in enumerate(shifted) if x != IGNORE]
    assert predicting == list(range(len(prompt) - 1, len(prompt) + len(harm)))


def test_rto_settings_travel_with_text_rows(tiny_tokenizer):
    import random

    from derta.data.tokenize import sample_rto_labels

    cfg = RecipeConfig(recipe="rto", rto_keep_ratio=0.25, rto_weight=2.0, refusal_phrase="sorry", template="inst")
    safe, rto = build_rows(cfg, [TRIPLE], [])
    assert rto["rto_keep_ratio"] == 0.25 and rto["loss_weight"] == 2.0 and rto["template"] == "inst"
    assert safe["refusal_phrase"] == rto["refusal_phrase"] == "sorry" and "loss_weight" not in safe
    # Tokenizing with other defaults still uses what the row carries.
    tok = tokenize_row(rto, tiny_tokenizer, template="chat", refusal_phrase="Sorry", rto_weight=1.0)
    assert tok["loss_weight"] == 2.0
    assert tiny_tokenizer.decode(tok["input_ids"], skip_special_tokens=True).startswith("[INST]")
    # Every position is labelled; the trainer keeps a fresh 25 % each epoch.
    n = sum(x != IGNORE for x in tok["labels"])
    assert n == len(encode_text(tiny_tokenizer, TRIPLE["harmful_response"])) + 1
    kept = [sample_rto_labels(tok["labels"], 0.25, random.Random(e)) for e in range(2)]
    assert all(sum(x != IGNORE for x in k) == round(0.25 * n) for k in kept) and kept[0] != kept[1]


def test_label_token_shares_and_rto_cap(tiny_tokenizer):
    from derta.data.tokenize import cap_rto_share, describe_shares, label_token_shares, tokenize_rows

    cfg = RecipeConfig(recipe="derta", seed=1)
    rows = tokenize_rows(build_rows(cfg, [TRIPLE] * 4, [HELPFUL] * 4), tiny_tokenizer, cfg)
    shares = label_token_shares(rows)
    assert set(shares) == {"helpful", "prefix", "rto"} and abs(sum(shares.values()) - 1) < 1e-3
    assert shares["rto"] > 0.25 and "warning: RTO is" in describe_shares(rows)
    ratio = cap_rto_share(rows, 0.1)
    assert 0 < ratio < 1 and abs(label_token_shares(rows)["rto"] - 0.1) < 1e-3
    assert "warning" not in describe_shares(rows)
    assert cap_rto_share(rows, 0.2) is None  # already under the cap


def test_no_prefix_ratio_and_short_responses_kept():
    triples = [dict(TRIPLE, instruction=f"q{i}") for i in range(30)] + [
        dict(TRIPLE, instruction="short", harmful_response="Okay")
    ]
    rows = build_rows(RecipeConfig(recipe="prefix", no_prefix_ratio=0.33, seed=1), triples, [])
    assert len(rows) == 31
    assert sum(r["prefix"] == "" for r in rows[:30]) in (9, 10)
    short = rows[-1]
    assert short["prefix"] == "" and short["target"] == TRIPLE["safe_response"]
    cuts = {r["prefix"] for r in rows if r["prefix"]}
    assert len(cuts) > 3, "prefix lengths should vary"


def test_word_and_token_cuts(tiny_tokenizer):
    text = "Step 1: do\n the  thing. Step 2: rest."
    assert word_cut(text, 3) == "Step 1: do"
    assert word_cut(text, 5) == "Step 1: do\n the  thing."
    rows = build_rows(
        RecipeConfig(recipe="prefix", cut="token", no_prefix_ratio=0.0, seed=5),
        [TRIPLE] * 5,
        [],
        tokenizer=tiny_tokenizer,
    )
    for r in rows:
        assert TRIPLE["harmful_response"].startswith(r["prefix"]) and r["prefix"] == r["prefix"].rstrip()
    with pytest.raises(InputError, match="needs --tokenizer"):
        build_rows(RecipeConfig(recipe="prefix", cut="token"), [TRIPLE], [])


def test_cli_build_is_deterministic_and_complete(tmp_path, tiny_dir):
    safety = write_jsonl(
        tmp_path / "s.jsonl", [dict(TRIPLE, instruction=f"How can I steal car {i}?") for i in range(20)]
    )
    helpful = write_jsonl(tmp_path / "h.jsonl", [HELPFUL])
    outs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(
                [
                    "data",
                    "build",
                    "--recipe",
                    "derta",
                    "--safety",
                    str(safety),
                    "--helpful",
                    str(helpful),
                    "--out",
                    str(out),
                    "--seed",
                    str(seed),
                    "--tokenizer",
                    str(tiny_dir),
                ]
            )
            == 0
        )
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    rows = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert len(rows) == 41 and all(len(r["input_ids"]) == len(r["labels"]) for r in rows)


@pytest.mark.parametrize(
    "content,message",
    [
        (
            '{"instruction": "a", "harmful_response": "b", "safe_response": "c"}\n{"instruction": "a",\n',
            ":2: malformed JSON",
        ),
        ('{"instruction": "a", "harmful_response": "b"}\n', ":1: safety row is missing field 'safe_response'"),
        (
            '{"instruction": "a", "harmful_response": 3, "safe_response": "c"}\n',
            ":1: field 'harmful_response' must be a string",
        ),
        ("\n\n", ": file is empty"),
        ("[1, 2]\n", ":1: expected a JSON object"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    out = tmp_path / "out.jsonl"
    assert main(["data", "build", "--recipe", "derta", "--safety", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{bad}{message}" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [bad], "nothing half-written"


def test_datasets_source_with_column_mapping(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"prompt": "q", "rejected": "bad words here", "chosen": "Sorry, no."}])
    ds.save_to_disk(str(tmp_path / "ds"))
    from derta.data.recipes import SAFETY_FIELDS
    from derta.data.sources import load_rows, parse_mapping

    rows = load_rows(
        str(tmp_path / "ds"),
        SAFETY_FIELDS,
        parse_mapping("instruction=prompt,harmful_response=rejected,safe_response=chosen"),
    )
    assert rows == [{"instruction": "q", "harmful_response": "bad words here", "safe_response": "Sorry, no."}]
    with pytest.raises(InputError, match="no column 'nope'"):
        load_rows(str(tmp_path / "ds"), SAFETY_FIELDS, {"instruction": "nope"})


def test_reference_format_rows_load(tmp_path, tiny_tokenizer):
    ref = write_jsonl(
        tmp_path / "ref.jsonl",
        [
            {"prefix": "[INST] q [\\INST] Step 1: x", "text": " Sorry, no.<|end_of_text|>", "safe": "false"},
            {"prefix": "[INST] q [\\INST]", "text": " Step 1: x.<|end_of_text|>", "safe": "true"},
        ],
    )
    mle, rto = load_training_rows(str(ref))
    assert (mle["kind"], rto["kind"]) == ("helpful", "rto")
    assert mle["target"] == " Sorry, no." and mle["template"] == "raw"
    tok = tokenize_row(mle, tiny_tokenizer)
    assert tiny_tokenizer.decode(trained(tok)[:-1]) == " Sorry, no."


def test_training_rows_validation(tmp_path):
    bad = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {"kind": "helpful", "instruction": "a", "target": "b"},
            {"kind": "rto", "input_ids": [1, 2], "labels": [-100]},
        ],
    )
    with pytest.raises(InputError, match=r"rows.jsonl:2: input_ids \(2\) and labels \(1\) differ"):
        load_training_rows(str(bad))
    bad = write_jsonl(tmp_path / "rows.jsonl", [{"kind": "weird", "instruction": "a", "target": "b"}])
    with pytest.raises(InputError, match="rows.jsonl:1: field 'kind'"):
        load_training_rows(str(bad))


def test_non_utf8_input_is_one_line(tmp_path, capsys):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(
        b'{"instruction": "a", "harmful_response": "b", "safe_response": "c"}\n{"instruction": "caf\xe9"}\n'
    )
    assert main(["data", "build", "--recipe", "vanilla", "--safety", str(bad), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert f"{bad}:2: not UTF-8 text" in capsys.readouterr().err
