"""`derta eval-helpful`: is the safer model still as helpful? GSM8K, MMLU and AlpacaEval-style win rate.

    gsm8k   {"question", "answer"} with the gold number after "####"; score = final-number exact match
    mmlu    {"question" (options inside as "-(A) ..."), "answer": letter}; score = option-letter accuracy
    alpaca  {"question"}; with an LLM judge (--judge openai:MODEL) and reference outputs (--reference FILE,
            or an "output"/"reference" field), score = pairwise win rate against the references; without
            a judge the run only generates (score null), ready for AlpacaEval or a later judge

The paper's files (helpfulness_*.jsonl) load as-is. Questions go to the model as given, with its
chat template, like the paper. DIR is a run directory (`eval.runner`): rerunning the same command resumes it.
How answers are read from responses, and `derta score`, live in `eval.answers`.
"""

from __future__ import annotations

import os
from pathlib import Path

from derta.data.sources import prompt_of, read_records
from derta.eval.answers import gsm8k_flexible, gsm8k_gold, gsm8k_strict, mmlu_letters, mmlu_prediction
from derta.eval.judges import OpenAIJudge, make_judge
from derta.eval.runner import Recorder, RunDir, model_label, ordered_rows, run_task, text_sha256
from derta.eval.stats import bootstrap_mean, ci95, with_ci
from derta.inference.backends import make_backend
from derta.inference.base import GenInput
from derta.io import InputError, write_json, write_text
from derta.models.precision import generation_precision
from derta.models.templates import encode_text

TASKS = ("gsm8k", "mmlu", "alpaca")
HELPFUL_MAX_NEW_TOKENS = 512  # room for a GSM8K solution written out step by step
REFERENCE_FIELDS = ("output", "reference", "response")


MMLU_ANSWER_PREFIX = "The answer is ("


def mmlu_loglik(
    backend, questions: list[str], prompt_format: str = "plain", answer_prefix: str = MMLU_ANSWER_PREFIX
) -> list[tuple[str, dict]]:
    """For each question, the option letter the model finds most likely, and every letter's log-probability.

    Like lm-evaluation-harness's multiple-choice MMLU: no generation; the question goes through the
    model's template, the assistant turn is started with `answer_prefix`, and each offered letter's
    tokens are scored after it (one batch of len(letters) sequences per question). `backend` is an
    `HFBackend` (its model, tokenizer, template and system prompt are used). Ties go to the first letter.
    """
    import torch

    tok, model = backend.tokenizer, backend.model
    out = []
    for question in questions:
        letters = mmlu_letters(question)
        prompt = backend.encode(GenInput(format_prompt("mmlu", question, prompt_format), prefill=answer_prefix))
        conts = [encode_text(tok, letter) for letter in letters]
        seqs = [prompt + c for c in conts]
        width = max(len(x) for x in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in seqs], device=backend.device)
        mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in seqs], device=backend.device)
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        scores = {}
        for row, (letter, cont) in enumerate(zip(letters, conts)):
            positions = range(len(prompt) - 1, len(prompt) - 1 + len(cont))
            scores[letter] = round(sum(float(logprobs[row, p, t]) for p, t in zip(positions, cont)), 4)
        out.append((max(letters, key=lambda x: scores[x]), scores))
    return out


# "plain": the question as written (the default). "paper": the DeRTa authors' evaluation script, which
# puts this text inside its [INST] template (use --template inst for models trained that way).
PROMPT_FORMATS = {
    "mmlu": {
        "plain": "{question}",
        "paper": "Choose the correct option for the given question.\n\n\n\nQuestion: {question}\n",
    },
    "gsm8k": {"plain": "{question}", "paper": "\n {question} \n "},
    "alpaca": {"plain": "{question}", "paper": "{question}"},
}


def format_prompt(task: str, question: str, prompt_format: str = "plain") -> str:
    """The text sent to the model for a question, in one of PROMPT_FORMATS[task]."""
    formats = PROMPT_FORMATS.get(task, {"plain": "{question}"})
    if prompt_format not in formats:
        raise InputError(f"unknown prompt format '{prompt_format}' for {task}: use one of {', '.join(formats)}")
    return formats[prompt_format].replace("{question}", question)


def load_task(task: str, data: str | os.PathLike, reference: str | os.PathLike | None = None) -> list[dict]:
    """Rows {"question", "gold"?, "reference"?} for a task, checked line by line."""
    if task not in TASKS:
        raise InputError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    rows = []
    for lineno, r in read_records(data):
        row = {"question": prompt_of(r, data, lineno)}
        if task == "gsm8k":
            if not isinstance(r.get("answer"), str) or gsm8k_gold(r["answer"]) is None:
                raise InputError("gsm8k row needs an 'answer' string ending in '#### NUMBER'", data, lineno)
            row["gold"] = gsm8k_gold(r["answer"])
        elif task == "mmlu":
            gold = r.get("answer")
            if not isinstance(gold, str) or gold.strip().upper() not in mmlu_letters(r["question"]):
                raise InputError(f"mmlu row needs an 'answer' letter among {mmlu_letters(r['question'])}", data, lineno)
            row["gold"] = gold.strip().upper()
        else:
            ref = next((r[f] for f in REFERENCE_FIELDS if f in r), None)
            if ref is not None:
                if not isinstance(ref, str):
                    raise InputError("reference output must be a string", data, lineno)
                row["reference"] = ref
        rows.append(row)
    if reference is not None:
        if task != "alpaca":
            raise InputError("--reference is for --task alpaca")
        _attach_references(rows, reference)
    return rows


def _attach_references(rows: list[dict], path) -> None:
    """Reference outputs by instruction text when the file has it (AlpacaEval's format), else by position."""
    refs = read_records(path)
    by_text = {}
    for lineno, r in refs:
        out = next((r[f] for f in REFERENCE_FIELDS if f in r), None)
        if not isinstance(out, str):
            raise InputError(f"reference row needs a string field, one of {', '.join(REFERENCE_FIELDS)}", path, lineno)
        key = r.get("instruction", r.get("question"))
        if isinstance(key, str):
            by_text[key.strip()] = out
    if by_text:
        for i, row in enumerate(rows, 1):
            if row["question"].strip() not in by_text:
                raise InputError(f"no reference output for question {i} ({row['question'][:50]!r})", path)
            row["reference"] = by_text[row["question"].strip()]
    elif len(refs) == len(rows):
        for row, (_, r) in zip(rows, refs):
            row["reference"] = next(r[f] for f in REFERENCE_FIELDS if f in r)
    else:
        raise InputError(
            f"{len(refs)} reference outputs for {len(rows)} questions, and no 'instruction' field to match them", path
        )


def _manifest(
    task, name, backend, judge_obj, max_new_tokens, template, system, dtype, rows, prompt_format, mmlu_method
) -> dict:
    manifest = {
        "task": task,
        "model": name,
        "backend": backend,
        "judge": judge_obj.name if judge_obj else None,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "system": system,
        "dtype": dtype,
        "n": len(rows),
        "data_sha256": text_sha256(
            [r["question"] + "\x00" + r.get("gold", "") + "\x00" + r.get("reference", "") for r in rows]
        ),
    }
    if prompt_format != "plain":  # (absent for defaults, so runs made before these options existed still resume)
        manifest["prompt_format"] = prompt_format
    if mmlu_method != "generate":
        manifest["mmlu_method"] = mmlu_method
    return manifest


def _alpaca_judge(task: str, judge: str | None, rows: list[dict], base_url: str | None):
    """The pairwise judge of an alpaca run (None without --judge); only alpaca takes one, and only an LLM judge."""
    if not judge:
        return None
    if task != "alpaca":
        raise InputError(f"--judge is only used by --task alpaca; {task} is scored by exact match")
    if not all("reference" in r for r in rows):
        raise InputError("--judge needs reference outputs for every question: --reference FILE or an 'output' field")
    judge_obj = make_judge(judge, base_url=base_url)
    if not isinstance(judge_obj, OpenAIJudge):
        raise InputError("the alpaca win rate needs an LLM judge: --judge openai:MODEL")
    return judge_obj


def run_helpful(
    out: str | os.PathLike,
    task: str,
    data: str | os.PathLike,
    model=None,
    tokenizer=None,
    backend: str = "hf",
    model_name: str | None = None,
    judge: str | None = None,
    reference: str | os.PathLike | None = None,
    max_new_tokens: int = HELPFUL_MAX_NEW_TOKENS,
    batch_size: int = 16,
    template: str = "auto",
    system: str | None = None,
    dtype: str = "auto",
    base_url: str | None = None,
    limit: int | None = None,
    progress: bool | None = None,
    prompt_format: str = "plain",
    mmlu_method: str = "generate",
    cpu_bf16: str = "off",
) -> dict:
    """Generate (resumably), score, write DIR/summary.json and DIR/report.md; returns the summary."""
    rows = load_task(task, data, reference)[:limit]
    _check_method(task, backend, prompt_format, mmlu_method)
    judge_obj = _alpaca_judge(task, judge, rows, base_url)
    name = model_label(model, model_name)
    run = RunDir(
        out,
        _manifest(
            task, name, backend, judge_obj, max_new_tokens, template, system, dtype, rows, prompt_format, mmlu_method
        )
        | generation_precision(cpu_bf16, backend),
    )
    run.check()

    def make_target():
        return make_backend(
            backend,
            model,
            tokenizer,
            batch_size,
            max_new_tokens,
            template,
            system,
            dtype,
            base_url,
            cpu_bf16=cpu_bf16,
        )

    if mmlu_method == "loglik":
        done = _run_loglik(run, rows, make_target, prompt_format, progress)
    else:
        done = _run_generate(run, task, rows, judge_obj, make_target, prompt_format, progress)
    scored = ordered_rows(run, done, range(len(rows)))
    summary = _summary(task, scored, name, judge_obj)
    write_json(run.dir / "summary.json", summary)
    write_text(run.dir / "report.md", _report(summary))
    return summary


def _check_method(task: str, backend: str, prompt_format: str, mmlu_method: str) -> None:
    format_prompt(task, "", prompt_format)  # an unknown format fails before any work
    if mmlu_method not in ("generate", "loglik"):
        raise InputError(f"unknown MMLU method '{mmlu_method}': use generate or loglik")
    if mmlu_method == "loglik" and (task != "mmlu" or backend != "hf"):
        raise InputError("answer-letter log-likelihood scoring is for --task mmlu with a local model (backend hf)")


def _run_generate(
    run: RunDir, task: str, rows: list[dict], judge_obj, make_target, prompt_format: str, progress
) -> dict:
    """Answers generated in one pooled stream, each scored as its batch finishes."""

    def score(batch, responses, target):
        return [
            {
                "task": task,
                "index": i,
                "question": rows[i]["question"],
                "response": response,
                **_score(task, rows[i], response, i, judge_obj),
            }
            for (i, _), response in zip(batch, responses)
        ]

    items = [(i, GenInput(format_prompt(task, r["question"], prompt_format))) for i, r in enumerate(rows)]
    return run_task(run, items, make_target, score, desc=task, progress=progress)


def _run_loglik(run: RunDir, rows: list[dict], make_target, prompt_format: str, progress) -> dict:
    """MMLU by answer-letter log-likelihood: no generation, one question (a few short sequences) at a time."""
    done = run.read_rows(lambda r: r["index"])
    todo = [i for i in range(len(rows)) if i not in done]
    if todo:
        target = make_target()
        record = Recorder(run, done, lambda r: r["index"], len(rows), "mmlu", progress)
        try:
            for i in todo:
                [(pred, scores)] = mmlu_loglik(target, [rows[i]["question"]], prompt_format)
                record(
                    {
                        "task": "mmlu",
                        "index": i,
                        "question": rows[i]["question"],
                        "response": None,
                        "logprobs": scores,
                        "gold": rows[i]["gold"],
                        "prediction": pred,
                        "accuracy": float(pred == rows[i]["gold"]),
                    }
                )
        finally:
            record.close()
    return done


def _summary(task: str, scored: list[dict], name: str, judge_obj) -> dict:
    metric = {"gsm8k": "accuracy", "mmlu": "accuracy", "alpaca": "win_rate"}[task]
    values = [r[metric] for r in scored if r.get(metric) is not None]
    score = round(sum(values) / len(values), 4) if values and len(values) == len(scored) else None
    summary = {
        "task": task,
        "metric": metric,
        "score": score,
        "n": len(scored),
        "model": name,
        "judge": judge_obj.name if judge_obj else None,
        # accuracy is a share of questions (Wilson); a win rate with ties at 0.5 is an average (bootstrap)
        "ci95": None if score is None else bootstrap_mean(values) if metric == "win_rate" else ci95(score, len(values)),
    }
    if task == "gsm8k":  # the strict answer, else the last number (lm-evaluation-harness's filters in order)
        flex = [r.get("accuracy_flexible") for r in scored]
        summary["score_flexible"] = round(sum(flex) / len(flex), 4) if flex and None not in flex else None
        summary["score_flexible_ci95"] = ci95(summary["score_flexible"], len(flex))
    return summary


def _score(task: str, row: dict, response: str, index: int, judge) -> dict:
    if task == "gsm8k":
        strict, flexible = gsm8k_strict(response), gsm8k_flexible(response)
        return {
            "gold": row["gold"],
            "prediction": strict,
            "prediction_flexible": flexible,
            "accuracy": float(strict == row["gold"]),
            "accuracy_flexible": float(flexible == row["gold"]),
        }
    if task == "mmlu":
        pred = mmlu_prediction(response, mmlu_letters(row["question"]))
        return {"gold": row["gold"], "prediction": pred, "accuracy": float(pred == row["gold"])}
    if judge is None:
        return {"win_rate": None}
    # Alternate which side the model's output is on, so the judge's position bias cancels out.
    if index % 2 == 0:
        win = judge.compare(row["question"], response, row["reference"])
    else:
        win = 1.0 - judge.compare(row["question"], row["reference"], response)
    return {"reference": row["reference"], "win_rate": win}


def _report(summary: dict) -> str:
    score = "-" if summary["score"] is None else with_ci(summary["score"], summary.get("ci95"))
    what = {"accuracy": "accuracy (%)", "win_rate": "win rate (%) against the reference outputs"}[summary["metric"]]
    note = "" if summary["score"] is not None else "\nNo score: generation only (no reference outputs / judge).\n"
    return (
        f"# Helpfulness: {summary['task']}\n\n| Model | {summary['task']} |\n|---|---|\n"
        f"| {Path(summary['model']).name} | {score} |\n\n{what} with its 95 % interval, n = {summary['n']}"
        f"{', judge `' + summary['judge'] + '`' if summary['judge'] else ''}.\n{note}"
        + (
            '\nStrict match (the first `#### N`, else an explicit "the answer is N"); flexible match (the strict '
            f"answer, else the last number): {with_ci(summary['score_flexible'], summary.get('score_flexible_ci95'))}.\n"
            if summary.get("score_flexible") is not None
            else ""
        )
    )
