"""Data: what training and evaluation read.

sources.py          reading users' rows (JSONL, CSV, .txt, `datasets`) and the one prompt-field rule
recipes.py          the recipe table and text rows for each (vanilla, prefix, RTO, DeRTa, baselines)
augment.py          what `data build` does to its inputs first: evaluation prompts out, rephrasings in
exclude.py          matching training prompts against evaluation prompts (exact and near-duplicates)
rephrase.py         rule-based rephrasing of a request (past, future, hypothetical, indirect); `pasttense` uses it
tokenize.py         text rows to input_ids / labels, labelled-token shares, reading built rows back
distill.py          `derta data distill`: helpful anchors the model writes itself
synthetic.py        the demo's synthetic splits (words and templates in synthetic_words.py)
facts.py            short factual questions: a real model's helpfulness in the demo
prompts/            the built-in benign prompts and a held-out over-refusal set (written for derta)
"""
