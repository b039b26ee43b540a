"""The synthetic demo data: deterministic, held out by combination, covered by the tokenizer corpus."""

import dataclasses
import json
import time

import pytest

from derta.data.synthetic import SyntheticData, helpful_correct, make_data, row_texts
from derta.data.synthetic_corpus import tokenizer_corpus
from derta.data.synthetic_words import (
    BENIGN_HOWTO,
    HARM_PAIRS,
    HARM_WORDS,
    HOWTO_TASK,
    PLAIN_WORDS,
    QUERY_TEMPLATES,
    text_words,
)

SPLITS = [f.name for f in dataclasses.fields(SyntheticData)]
SMALL = dict(
    n_helpful_train=200,
    n_helpful_test=20,
    n_lookalike_train=60,
    n_lookalike_test=20,
    n_harmful_train=60,
    n_harmful_test=20,
)


@pytest.fixture(scope="module")
def data():
    return make_data(seed=0)


def dump(d: SyntheticData) -> str:
    return json.dumps(dataclasses.asdict(d), sort_keys=True)


def words_of(rows):
    return {w for r in rows for t in row_texts(r) for w in text_words(t)}


def test_deterministic_and_seed_dependent():
    assert dump(make_data(seed=3)) == dump(make_data(seed=3))
    assert dump(make_data(seed=3)) != dump(make_data(seed=4))
    assert tokenizer_corpus() == tokenizer_corpus()


def test_fast():
    start = time.perf_counter()
    make_data()
    assert time.perf_counter() - start < 1.0


def test_default_sizes(data):
    assert [len(getattr(data, s)) for s in SPLITS] == [2000, 200, 600, 120, 600, 120]
    assert len(data.lookalike_test) >= 100


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_custom_sizes(seed):
    d = make_data(seed=seed, **SMALL)
    assert [len(getattr(d, s)) for s in SPLITS] == [200, 20, 60, 20, 60, 20]


def test_impossible_size_is_value_error():
    with pytest.raises(ValueError):
        make_data(n_harmful_test=10_000)
    with pytest.raises(ValueError):
        make_data(n_helpful_train=-1)


def test_fields(data):
    for split in ("helpful_train", "helpful_test", "lookalike_train", "lookalike_test"):
        for row in getattr(data, split):
            assert set(row) == {"instruction", "response", "answer", "task"}
            assert all(isinstance(v, str) and v for v in row.values())
            assert len(row["response"].split()) <= 20
    for row in data.harmful_train + data.harmful_test:
        assert set(row) == {"instruction", "harmful_response", "safe_response", "category"}
        assert 25 <= len(row["harmful_response"].split()) <= 60
        assert "Step 1:" in row["harmful_response"]


def test_no_duplicates_within_splits(data):
    for split in SPLITS:
        prompts = [r["instruction"] for r in getattr(data, split)]
        assert len(prompts) == len(set(prompts)), split
    responses = [r["harmful_response"] for r in data.harmful_train]
    assert len(responses) == len(set(responses))


@pytest.mark.parametrize("sizes", [{}, SMALL])
def test_held_out(sizes):
    d = make_data(seed=1, **sizes)
    train = d.helpful_train + d.lookalike_train + d.harmful_train
    train_prompts = {r["instruction"] for r in train}
    seen = words_of(train)
    for split in ("helpful_test", "lookalike_test", "harmful_test"):
        rows = getattr(d, split)
        assert not {r["instruction"] for r in rows} & train_prompts, split
        assert words_of(rows) <= seen, (split, sorted(words_of(rows) - seen))
    assert not ({r["harmful_response"] for r in d.harmful_test} & {r["harmful_response"] for r in d.harmful_train})
    # Harmful test rows are about (verb, object) pairs that no training row is about.
    pair_of = {t.format(verb=v, obj=o): (v, o) for t in QUERY_TEMPLATES for v, o in HARM_PAIRS}
    train_pairs = {pair_of[r["instruction"]] for r in d.harmful_train}
    test_pairs = {pair_of[r["instruction"]] for r in d.harmful_test}
    assert not train_pairs & test_pairs
    # ... but every verb and object of a test pair occurs in some training pair.
    assert {v for v, _ in test_pairs} <= {v for v, _ in train_pairs}
    assert {o for _, o in test_pairs} <= {o for _, o in train_pairs}


def test_safe_responses_start_with_sorry(data):
    for row in data.harmful_train + data.harmful_test:
        assert row["safe_response"].startswith("Sorry")
        assert not row["harmful_response"].startswith("Sorry")


def test_splits_are_what_they_claim(data):
    plain, harm = set(PLAIN_WORDS), set(HARM_WORDS)
    for row in data.helpful_train + data.helpful_test:
        assert set(text_words(row["answer"])) <= plain  # helpful rows never mention harm words
    copy_rows = [r for r in data.lookalike_train + data.lookalike_test if r["task"] != HOWTO_TASK]
    howto_rows = [r for r in data.lookalike_train + data.lookalike_test if r["task"] == HOWTO_TASK]
    assert copy_rows and howto_rows
    assert all(set(text_words(r["instruction"])) & harm for r in copy_rows)
    idioms = {o for _, o, _ in BENIGN_HOWTO}
    assert all(any(o in r["instruction"] for o in idioms) for r in howto_rows)
    # Idioms and harmful requests share verbs (that is what makes them look alike).
    assert {v for v, _, _ in BENIGN_HOWTO} <= {v for v, _ in HARM_PAIRS}


def test_reference_responses_score_correct(data):
    for split in ("helpful_train", "helpful_test", "lookalike_train", "lookalike_test"):
        for row in getattr(data, split):
            assert helpful_correct(row["response"], row["answer"])


@pytest.mark.parametrize(
    "response, answer, ok",
    [
        ("blue", "blue", True),
        ("  Blue.  ", "blue", True),
        ("apple   river\tblue!", "apple river blue", True),
        ("apple river blue\nand then some junk", "apple river blue", True),  # first line only
        ("\n\nblue\nmore", "blue", True),  # leading whitespace stripped first
        ("Sure, here is how to kill time. Read a book.", "Sure, here is how to kill time. Read a book.", True),
        ("blue river", "blue", False),
        ("apple river", "apple river blue", False),
        ("Sorry, I cannot help with that.", "blue", False),
        ("", "blue", False),
        ("blue", "", False),
        ("apple\nriver blue", "apple river blue", False),
        ("apple, river blue", "apple river blue", False),  # inner punctuation counts
    ],
)
def test_helpful_correct(response, answer, ok):
    assert helpful_correct(response, answer) is ok


def test_tokenizer_corpus_covers_output():
    corpus = tokenizer_corpus()
    assert all(isinstance(line, str) for line in corpus)
    assert sum(len(line) + 1 for line in corpus) < 2_000_000
    vocab = {w for line in corpus for w in text_words(line)}
    for d in (make_data(seed=0), make_data(seed=5), make_data(seed=2, **SMALL)):
        for split in SPLITS:
            missing = words_of(getattr(d, split)) - vocab
            assert not missing, (split, sorted(missing))
    assert vocab >= set(PLAIN_WORDS) | set(HARM_WORDS) | set("0123456789")
    assert any(line.startswith("Sorry") for line in corpus)
    assert any(" Sorry" in line for line in corpus)
    # Each word is frequent enough for BPE to merge it into one token.
    counts = {}
    for line in corpus:
        for w in text_words(line):
            counts[w] = counts.get(w, 0) + 1
    assert min(counts.values()) >= 10
