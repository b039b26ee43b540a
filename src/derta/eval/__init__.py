"""Evaluation: attack a model, decide what its responses are, and measure it.

runner.py       the one resumable task runner and run-directory format every evaluation uses
refusal.py      the one refusal decision (`refuses`, `is_refusal`, `degenerate`); phrases.py its tables
judges.py       keyword, LLM (rubrics.py) and local-classifier judges; agreement.py: against human labels
attacks.py      static attacks and harmful-prefix prefills; search.py: PAIR and AutoDAN
safety.py       `derta eval`: attack success rates
helpfulness.py  `derta eval-helpful` (answers.py: answer extraction, `derta score`)
overrefusal.py  `derta eval-overrefusal`
probe.py        `derta probe`: refusal probability along a harmful response, teacher forced
"""
