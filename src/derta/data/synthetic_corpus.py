"""The tiny model's tokenizer corpus: every word and phrase the synthetic data can emit, many times over."""

from __future__ import annotations

import itertools
import random
import re

from derta.data.synthetic import copy_row, harmful_response, make_data, row_texts
from derta.data.synthetic_words import (
    BENIGN_HOWTO,
    BENIGN_RESPONSE,
    COPY_TASKS,
    HARM_PAIRS,
    HARM_WORDS,
    OPENERS,
    PLAIN_WORDS,
    QUERY_TEMPLATES,
    REFUSALS,
    STEP_SLOTS,
    STEP_TEMPLATES,
    text_words,
)


def tokenizer_corpus() -> list[str]:
    """Lines of text for training the demo's byte-level BPE tokenizer.

    Covers every word and phrase the generator can emit, each many times and both at a line
    start and after a space (byte-level BPE tokenises "Sorry" and " Sorry" differently), so that
    demo words become single tokens. It contains refusals at a line start and after a harmful
    prefix (" Sorry", the DeRTa harmful-prefix layout). Deterministic, about 1.3 MB.
    """
    rng = random.Random(20240712)
    lines: list[str] = []

    # Every request, harmful and benign, with every template.
    for template in QUERY_TEMPLATES:
        lines += [template.format(verb=v, obj=o) for v, o in HARM_PAIRS]
        lines += [template.format(verb=v, obj=o) for v, o, _ in BENIGN_HOWTO]
    # Every benign idiom answer; every opener and refusal for every pair.
    lines += [BENIGN_RESPONSE.format(verb=v, obj=o, tip=tip) for v, o, tip in BENIGN_HOWTO]
    for v, o in HARM_PAIRS:
        lines += [harmful_response(rng, v, o) for _ in OPENERS]
        lines += [r.format(verb=v, obj=o) for r in REFUSALS]
    # Every placeholder step with every slot filling, numbered 1-9.
    for template in STEP_TEMPLATES:
        names = re.findall(r"{(\w+)}", template)
        for i, fill in enumerate(itertools.product(*(STEP_SLOTS[n] for n in names))):
            lines.append(f"Step {i % 9 + 1}: {template.format(**dict(zip(names, fill)))}.")
    # Copy tasks over plain words and over plain words mixed with harm words.
    for _ in range(4):
        for task in COPY_TASKS:
            lines += [copy_row(rng, task, PLAIN_WORDS)["instruction"] for _ in range(100)]
            lines += [copy_row(rng, task, PLAIN_WORDS, HARM_WORDS)["instruction"] for _ in range(50)]
    # Rows as the demo sees them, and refusals after a harmful prefix (" Sorry" mid-line).
    data = make_data(seed=0)
    for rows in (data.helpful_train, data.lookalike_train, data.harmful_train):
        for row in rows:
            lines += row_texts(row)
    for row in data.harmful_train:
        words = row["harmful_response"].split()
        lines.append(" ".join(words[: rng.randint(1, len(words))]) + " " + row["safe_response"])
    # Digits, and then every word seen above many times at line start and mid-line.
    lines += [" ".join(str(d) for d in rng.sample(range(10), 10)) for _ in range(50)]
    vocab = list(dict.fromkeys(PLAIN_WORDS + HARM_WORDS + [w for line in lines for w in text_words(line)]))
    # One line starting at each word (a response's first word follows a newline, with no space).
    for _ in range(12):
        order = rng.sample(vocab, len(vocab))
        lines += [" ".join((order + order[:5])[i : i + 6]) for i in range(len(order))]
    return lines
