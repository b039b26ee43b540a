"""The demo's measurements of one model, on held-out prompts only.

    evaluate_model    refusal, prefill attack success (judged harmful) at each cut, helpfulness, over-refusal, the probe curve
    dial              a refusal-token model at the thresholds of several over-refusal targets
    evaluate_extras   a real model's `derta eval` attacks and `derta eval-overrefusal` prompts

Every rate reads responses with the one refusal decision, `eval.refusal.refuses`. With a real model
(`cfg.model`), examples of responses to harmful prompts are shown only where they refuse: a real model's
harmful text stays in the demo directory's run files and never reaches a report.
"""

from __future__ import annotations

import re
from pathlib import Path

from derta.calibrate.run import load_scores
from derta.calibrate.sweep import calibrate_table
from derta.data.synthetic import helpful_correct
from derta.eval.judges import KeywordJudge
from derta.eval.overrefusal import run_overrefusal
from derta.eval.probe import probe
from derta.eval.refusal import degenerate, refuses
from derta.eval.runner import RunDir, file_sha256, run_task, text_sha256
from derta.eval.safety import EvalConfig, run_eval
from derta.eval.search import make_attacks
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend
from derta.inference.policy import RefusalPolicy
from derta.models.precision import generation_precision
from derta.models.refusal_tokens import marker_tokens, refusal_tokens
from derta.recipes.demo.config import DemoConfig


def generate(
    model,
    tokenizer,
    inputs: list[GenInput],
    cfg: DemoConfig,
    desc: str,
    progress: bool,
    policy=None,
    show_refusal_tokens: bool = False,
    run: RunDir | None = None,
) -> list[str]:
    """Responses to `inputs` in order, through the one task runner (`run` keeps them, so a rerun resumes)."""
    rows = generate_rows(model, tokenizer, inputs, cfg, desc, progress, policy, show_refusal_tokens, run)
    return [r["response"] for r in rows]


def generate_rows(
    model,
    tokenizer,
    inputs: list[GenInput],
    cfg: DemoConfig,
    desc: str,
    progress: bool,
    policy=None,
    show_refusal_tokens: bool = False,
    run: RunDir | None = None,
) -> list[dict]:
    """`generate`'s rows in input order: each response, and `reset` where a backtracking model reset."""

    def backend():
        return HFBackend(
            model,
            tokenizer,
            batch_size=cfg.eval_batch_size,
            max_new_tokens=cfg.max_new_tokens,
            policy=policy,
            show_refusal_tokens=show_refusal_tokens,
            cpu_bf16=cfg.cpu_bf16,
        )

    def score(batch, responses, _):
        return [
            {"index": i, "prompt": inp.text, **({"prefill": inp.prefill} if inp.prefill else {}), "response": r}
            for (i, inp), r in zip(batch, responses)
        ]

    rows = run_task(run, list(enumerate(inputs)), backend, score, desc=desc, progress=progress)
    return [rows[i] for i in range(len(inputs))]


def _inputs(data, cfg: DemoConfig, tokenizer, helpful: list[dict]) -> list[tuple[str, GenInput]]:
    """(group, input) pairs: plain harmful prompts, each prefill cut, helpful tasks, benign look-alikes."""
    groups = [("harmful", GenInput(r["instruction"])) for r in data.harmful_test]
    # derta eval's prefill-frac attacks: the assistant turn is forced to start with the first round(f*n)
    # tokens of the harmful response (no trailing whitespace); only the model's continuation is judged.
    for f, attack in zip(cfg.prefill_fractions, make_attacks([f"prefill-frac:{f}" for f in cfg.prefill_fractions])):
        groups += [
            (f"prefill:{f}", attack.apply(r["instruction"], r["harmful_response"], tokenizer))
            for r in data.harmful_test
        ]
    groups += [("helpful", GenInput(r["instruction"])) for r in helpful]
    groups += [("lookalike", GenInput(r["instruction"])) for r in data.lookalike_test]
    return groups


def _reset_rates(groups: list[tuple[str, GenInput]], rows: list[dict], cfg: DemoConfig) -> dict:
    """A backtracking model's [RESET]s: needless on benign look-alikes (beside over-refusal), wanted after a prefill."""
    reset: dict[str, list[bool]] = {}
    for (name, _), row in zip(groups, rows):
        reset.setdefault(name, []).append(bool(row.get("reset")))
    cuts = [f"prefill:{f}" for f in cfg.prefill_fractions]
    return {
        "benign_reset": _share(reset["lookalike"], bool),
        "prefill_reset": sum(_share(reset[c], bool) for c in cuts) / len(cuts),
    }


def _judged_harmful(pairs: list[tuple[GenInput, str]]) -> float:
    """The share `derta eval --judge keyword` counts as attack successes: the same judge, given the same question."""
    verdicts = KeywordJudge().judge([i.text for i, _ in pairs], [r for _, r in pairs])
    return sum(v.harmful for v in verdicts) / max(1, len(verdicts))


def _share(responses: list[str], test) -> float:
    return sum(map(test, responses)) / max(1, len(responses))


def evaluate_model(
    model,
    tokenizer,
    data,
    cfg: DemoConfig,
    progress: bool = True,
    helpful_rows: list[dict] | None = None,
    correct=None,
    policy=None,
    run_dir: Path | None = None,
) -> dict:
    """The demo's metrics for one model, on held-out splits only.

    Helpfulness is `correct(response, row["answer"])` over `helpful_rows` (default: the synthetic
    copy tasks, exact match). `policy` (inference.policy.RefusalPolicy): thresholds on a refusal-token
    model's tokens during generation. `run_dir`: where the generations are kept (a run directory).
    """
    helpful = data.helpful_test if helpful_rows is None else helpful_rows
    correct = correct or helpful_correct
    groups = _inputs(data, cfg, tokenizer, helpful)
    run = None
    if run_dir is not None:
        run = RunDir(
            run_dir,
            {
                "model": getattr(model, "name_or_path", None),
                "max_new_tokens": cfg.max_new_tokens,
                "inputs_sha256": text_sha256([f"{i.text}\x00{i.prefill}" for _, i in groups]),
                "policy": None if policy is None else [policy.thresholds, policy.biases],
            },
        )
        run.check()
    rows = generate_rows(model, tokenizer, [inp for _, inp in groups], cfg, "generate", progress, policy, run=run)
    by_group: dict[str, list[tuple[GenInput, str]]] = {}
    for (name, inp), row in zip(groups, rows):
        by_group.setdefault(name, []).append((inp, row["response"]))
    metrics = {**_rates(by_group, cfg, helpful, correct, data.lookalike_test), **_reset_rates(groups, rows, cfg)}
    probe_result = probe(
        model,
        tokenizer,
        [(r["instruction"], r["harmful_response"]) for r in data.harmful_test],
        batch_size=cfg.eval_batch_size,
        points=11,
    )
    metrics.update(
        {
            "probe_curve": probe_result["curve"],
            "probe_mean": probe_result["mean_refusal_prob"],
            "n": {"harmful": len(data.harmful_test), "helpful": len(helpful), "lookalike": len(data.lookalike_test)},
        }
    )
    metrics["examples"] = _examples(by_group, cfg)
    return metrics


def _rates(by_group: dict, cfg: DemoConfig, helpful: list[dict], correct, lookalike: list[dict]) -> dict:
    """Refusal, prefill attack success, the prefill continuations that do not refuse (harmful text or degenerate),
    helpfulness, over-refusal and degenerate shares, from the (input, response) pairs of each group."""
    texts = {name: [r for _, r in pairs] for name, pairs in by_group.items()}
    cuts = [str(f) for f in cfg.prefill_fractions]
    prefill = {f: texts[f"prefill:{f}"] for f in cuts}
    # Prefill ASR means what `derta eval --judge keyword` means: the continuation is judged harmful. The wider share
    # that does not refuse cleanly (degenerate loops too) has its own name.
    prefill_asr = {f: _judged_harmful(by_group[f"prefill:{f}"]) for f in cuts}
    not_refused = {f: _share(rs, lambda r: not refuses(r, harmful=True)) for f, rs in prefill.items()}

    def accuracy(group: str, rows: list[dict], score) -> float:
        return sum(score(resp, row["answer"]) for resp, row in zip(texts.get(group, []), rows)) / max(1, len(rows))

    refusals = [r for r in texts["harmful"] if refuses(r, harmful=False)]
    return {
        "refusal_rate": _share(texts["harmful"], lambda r: refuses(r, harmful=True)),
        "prefill_asr": prefill_asr,
        "prefill_asr_mean": sum(prefill_asr.values()) / len(prefill_asr),
        "prefill_not_refused": not_refused,
        "prefill_not_refused_mean": sum(not_refused.values()) / len(not_refused),
        "helpfulness": accuracy("helpful", helpful, correct),
        "over_refusal": _share(texts["lookalike"], lambda r: refuses(r, harmful=False)),
        "lookalike_accuracy": accuracy("lookalike", lookalike, helpful_correct),
        # Response quality next to the rates: a refusal that loops ("Sorry Sorry Sorry") is visible here.
        "degenerate_rate": {
            "harmful": _share(texts["harmful"], lambda r: degenerate(r) is not None),
            "prefill": {f: _share(rs, lambda r: degenerate(r) is not None) for f, rs in prefill.items()},
            "helpful": _share(texts.get("helpful", []), lambda r: degenerate(r) is not None),
        },
        "clean_refusal_share": sum(degenerate(r) is None for r in refusals) / len(refusals) if refusals else None,
    }


def _examples(by_group: dict, cfg: DemoConfig) -> dict:
    """A few generations per group for the report; a real model's only where they refuse."""
    mid = f"prefill:{cfg.prefill_fractions[len(cfg.prefill_fractions) // 2]}"

    def shown(r):
        return refuses(r, harmful=False) if cfg.model else True

    return {
        "harmful": [{"prompt": i.text, "response": r} for i, r in by_group["harmful"] if shown(r)][: cfg.examples],
        "prefill": [
            {"prompt": i.text, "prefill": "" if cfg.model else i.prefill, "continuation": r}
            for i, r in by_group[mid]
            if shown(r)
        ][: cfg.examples],
        "helpful": [{"prompt": i.text, "response": r} for i, r in by_group.get("helpful", [])[: cfg.examples]],
        "lookalike": [{"prompt": i.text, "response": r} for i, r in by_group["lookalike"][: cfg.examples]],
    }


def dial(model, tokenizer, data, cfg: DemoConfig, scores: Path, progress: bool) -> list[dict]:
    """Held-out refusal, over-refusal and prefill ASR (middle cut) at the thresholds each over-refusal target in
    cfg.dial gives on the calibration scores, and with no thresholds at all (plain greedy decoding).

    Two readings of each response: the decision (a refusal token fired) and the visible text (a refusal by
    `eval.refusal.refuses`, tokens hidden). They differ where the model, made to refuse, writes its answer anyway."""
    table = load_scores(scores)
    refuse = list(refusal_tokens(tokenizer))
    # The visible text, as a user sees it: every marker ([respond] too) taken out of the shown responses.
    hidden = re.compile("|".join(map(re.escape, marker_tokens(tokenizer))))
    frac = cfg.prefill_fractions[len(cfg.prefill_fractions) // 2]
    attack = make_attacks([f"prefill-frac:{frac}"])[0]
    inputs = (
        [GenInput(r["instruction"]) for r in data.harmful_test]
        + [GenInput(r["instruction"]) for r in data.lookalike_test]
        + [attack.apply(r["instruction"], r["harmful_response"], tokenizer) for r in data.harmful_test]
    )
    n_h, n_l = len(data.harmful_test), len(data.lookalike_test)
    points = []
    for target in (None, *cfg.dial):
        policy = None
        if target is not None:
            policy = RefusalPolicy(calibrate_table(table, max_over_refusal=target)["thresholds"])
        shown = generate(model, tokenizer, inputs, cfg, "dial", progress, policy, show_refusal_tokens=True)
        fired = [any(t in r for t in refuse) for r in shown]
        responses = [hidden.sub("", r) for r in shown]
        harmful, lookalike, prefill = responses[:n_h], responses[n_h : n_h + n_l], responses[n_h + n_l :]
        points.append(
            {
                "max_over_refusal": target,
                "refusal": _share(harmful, lambda r: refuses(r, harmful=True)),
                "over_refusal": _share(lookalike, lambda r: refuses(r, harmful=False)),
                "prefill_asr": _judged_harmful(list(zip(inputs[n_h + n_l :], prefill))),
                "prefill_fraction": frac,
                "fired_harmful": _share(fired[:n_h], bool),
                "fired_lookalike": _share(fired[n_h : n_h + n_l], bool),
                "fired_prefill": _share(fired[n_h + n_l :], bool),
            }
        )
    return points


def evaluate_extras(
    model, tokenizer, path: Path, name: str, out: Path, cfg: DemoConfig, progress: bool, policy=None
) -> dict:
    """A real-model demo's evaluations beyond the synthetic ones: `derta eval`'s plain, completion and prefill
    attacks on --eval-prompts, and `derta eval-overrefusal` on --overrefusal-prompts (run directories in OUT)."""
    extras: dict = {}
    calibration = out / "calibration" / name / "calibration.json" if policy is not None else None
    if cfg.eval_prompts:
        run = EvalConfig(
            out / "attacks" / name / "eval_prompts",
            cfg.eval_prompts,
            "none,completion,prefill",
            "keyword",
            model=str(path),
            max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.eval_batch_size,
            limit=cfg.eval_limit,
            calibration=calibration,
            cpu_bf16=cfg.cpu_bf16,
        )
        summary = run_eval(run, model=model, tokenizer=tokenizer, progress=progress)
        extras["eval"], extras["eval_n"] = summary["asr"], summary["n"]
    if cfg.overrefusal_prompts:
        settings = {
            "max_new_tokens": cfg.max_new_tokens,
            "calibration_sha256": file_sha256(calibration) if calibration is not None else None,
        } | generation_precision(cfg.cpu_bf16)
        summary = run_overrefusal(
            out / "overrefusal" / name,
            cfg.overrefusal_prompts,
            lambda: HFBackend(
                model,
                tokenizer,
                batch_size=cfg.eval_batch_size,
                max_new_tokens=cfg.max_new_tokens,
                policy=policy,
                cpu_bf16=cfg.cpu_bf16,
            ),
            str(path),
            progress=progress,
            settings=settings,
        )
        # The report keeps the scores (the summary's other keys name the run).
        extras["overrefusal"] = {k: v for k, v in summary.items() if k not in ("model", "prompts", "n")}
    return extras
