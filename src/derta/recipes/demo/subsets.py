"""The demo's Cliff-as-a-Judge comparison: DeRTa trained on a tenth of the safety triples, chosen by refusal cliff
or at random, beside DeRTa on all of them.

"Refusal Falls off a Cliff" selects the training rows whose refusal signal the model loses furthest; here the
signal is `derta directions`' refusal direction of the untuned model (fitted on the run's own training prompts:
its harmful requests against its helpful ones), the cliff `derta probe --directions`' (teacher forced on
instruction + harmful response), and the selection `data build --select-by-cliff`'s. A random tenth of the same
size, drawn with the run's seed, says how much of the result is the choice and how much the smaller set.
"""

from __future__ import annotations

import random
from pathlib import Path

from derta.data.recipes import RECIPES, SUBSET_SHARE
from derta.eval.latent import run_directions
from derta.eval.probe_run import kept_count, select_by_cliff
from derta.io import write_json, write_jsonl


def subset_triples(recipe: str, base: Path, out: Path, triples: list[dict], helpful: list[dict], seed: int):
    """The safety triples a subset recipe trains on (all of them for any other recipe), and its report or None."""
    kind = RECIPES[recipe].subset
    if kind is None:
        return triples, None
    if kind == "random":
        keep = kept_count(SUBSET_SHARE, len(triples))
        chosen = sorted(random.Random(seed).sample(range(len(triples)), keep))
        return [triples[i] for i in chosen], {"subset": "random", "n": len(triples), "kept": keep, "seed": seed}
    directions = out / "cliff" / "directions"
    if not (directions / "directions.json").exists():
        harmful, harmless = out / "cliff" / "harmful_prompts.jsonl", out / "cliff" / "harmless_prompts.jsonl"
        write_jsonl(harmful, [{"prompt": t["instruction"]} for t in triples])
        write_jsonl(harmless, [{"prompt": h["instruction"]} for h in helpful])
        run_directions(str(base), str(harmful), str(harmless), str(directions), seed=seed)
    kept, report = select_by_cliff(triples, str(base), str(directions), SUBSET_SHARE)
    report = {"subset": "cliff", **{k: v for k, v in report.items() if k != "cliffs"}}
    write_json(out / "cliff" / f"{recipe}.json", report)
    return kept, report
