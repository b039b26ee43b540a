"""Data: what training and evaluation read.

sources.py          reading users' rows (JSONL, JSON arrays, CSV, .txt, `datasets`) and the one prompt-field rule
shapes.py           the data shapes read without a column mapping (PKU-SafeRLHF, BeaverTails, AdvBench, HarmBench, chat,
                    Alpaca), and the errors that name the fix
recipes.py          the recipe table and text rows for each (vanilla, prefix, RTO, DeRTa, baselines)
tokenize.py         text rows to input_ids / labels, labelled-token shares, reading built rows back
distill.py          `derta data distill`: helpful anchors the model writes itself
synthetic.py        the demo's synthetic splits (words and templates in synthetic_words.py)
facts.py            short factual questions: a real model's helpfulness in the demo
prompts/            the built-in benign prompts and a held-out over-refusal set (written for derta)
"""
