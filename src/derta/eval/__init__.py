"""Evaluation: attack a model, decide what its responses are, and measure it.

runner.py       the one resumable task runner and run-directory format every evaluation uses
refusal.py      the one refusal decision (`refuses`, `is_refusal`); phrases.py its tables, parts.py two-part
                requests, degenerate.py text with no content (`degenerate`)
judges.py       keyword, LLM (rubrics.py) and local-classifier judges; agreement.py: against human labels
attacks.py      static attacks, harmful-prefix prefills, in-the-wild templates; search.py: PAIR and AutoDAN
safety.py       `derta eval`: attack success rates (summary.py: summary.json and report.md; depth.py: the depth curve)
stats.py        95 % intervals for every rate reported
helpfulness.py  `derta eval-helpful` (answers.py: answer extraction, `derta score`)
overrefusal.py  `derta eval-overrefusal`
probe.py        the output probe: refusal probability along a harmful response, teacher forced; probe_run.py runs
                `derta probe` (several models, --directions) and the cliff selection of `data build`
directions.py   harmfulness and refusal directions in the hidden states, scores along a sequence, the refusal cliff;
                latent.py: `derta directions` (the fit, the latent guard, refusal predicted from the prompt alone)
"""
