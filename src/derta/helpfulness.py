"""`derta eval-helpful`: is the safer model still as helpful? GSM8K, MMLU and AlpacaEval-style win rate.

    gsm8k   {"question", "answer"} with the gold number after "####"; score = final-number exact match
    mmlu    {"question" (options inside as "-(A) ..."), "answer": letter}; score = option-letter accuracy
    alpaca  {"question"}; with an LLM judge (--judge openai:MODEL) and reference outputs (--reference FILE,
            or an "output"/"reference" field), score = pairwise win rate against the references; without
            a judge the run only generates (score null), ready for AlpacaEval or a later judge

The paper's files (helpfulness_*.jsonl) load as-is. Questions go to the model as given, with its
chat template, like the paper. The run directory resumes exactly as `derta eval`'s does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .evaluate import RunDir, model_label, text_sha256
from .io import InputError, read_jsonl, write_json, write_text

TASKS = ("gsm8k", "mmlu", "alpaca")
REFERENCE_FIELDS = ("output", "reference", "response")


# ---------------------------------------------------------------- answers


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _clean_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7'; None if not a number."""
    text = text.replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def gsm8k_gold(answer: str) -> str | None:
    m = re.search(r"####\s*(" + _NUMBER + ")", answer)
    return _clean_number(m.group(1)) if m else None


def gsm8k_prediction(response: str) -> str | None:
    """The model's final number: after "####" or "the answer is", else the last number in the response."""
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer is:?\s*\**\s*(" + _NUMBER + ")"):
        found = re.findall(pattern, response, re.IGNORECASE)
        if found:
            return _clean_number(found[-1])
    numbers = re.findall(_NUMBER, response)
    return _clean_number(numbers[-1]) if numbers else None


def mmlu_letters(question: str) -> str:
    """The option letters a question offers ("-(A) ..." lines), A-D if none are marked."""
    letters = "".join(dict.fromkeys(re.findall(r"^\s*-?\(([A-Z])\)", question, re.MULTILINE)))
    return letters or "ABCD"


def mmlu_prediction(response: str, letters: str = "ABCD") -> str | None:
    """The chosen option: "answer is (B)", "(B)", "B." / "B)" at the start, or a lone letter."""
    ls = re.escape(letters)
    for pattern in (rf"answer is:?\s*\(?([{ls}])\b", rf"answer:\s*\(?([{ls}])\b", rf"\(([{ls}])\)",
                    rf"^\s*([{ls}])(?:[.):]|\s|$)", rf"\b([{ls}])\b"):
        m = re.search(pattern, response, re.IGNORECASE if "answer" in pattern else 0)
        if m:
            return m.group(1).upper()
    return None


# ---------------------------------------------------------------- data


def load_task(task: str, data: str | os.PathLike, reference: str | os.PathLike | None = None) -> list[dict]:
    """Rows {"question", "gold"?, "reference"?} for a task, checked line by line."""
    if task not in TASKS:
        raise InputError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    rows = []
    for lineno, r in read_jsonl(data, required=("question",), with_lines=True):
        row = {"question": r["question"]}
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
    refs = read_jsonl(path, with_lines=True)
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
        raise InputError(f"{len(refs)} reference outputs for {len(rows)} questions, and no 'instruction' field to match them", path)


# ---------------------------------------------------------------- the run


def run_helpful(out: str | os.PathLike, task: str, data: str | os.PathLike, model=None, tokenizer=None, backend: str = "hf",
                model_name: str | None = None, judge: str | None = None, reference: str | os.PathLike | None = None,
                max_new_tokens: int = 512, batch_size: int = 16, template: str = "auto", system: str | None = None,
                dtype: str = "auto", base_url: str | None = None, limit: int | None = None, progress: bool | None = None) -> dict:
    """Generate (resumably), score, write DIR/summary.json and DIR/report.md; returns the summary."""
    from .generate import GenInput, make_backend
    from .judges import OpenAIJudge, make_judge

    rows = load_task(task, data, reference)[:limit]
    has_refs = task == "alpaca" and all("reference" in r for r in rows)
    judge_obj = None
    if task == "alpaca" and judge:
        if not has_refs:
            raise InputError("--judge needs reference outputs for every question: --reference FILE or an 'output' field")
        judge_obj = make_judge(judge, base_url=base_url)
        if not isinstance(judge_obj, OpenAIJudge):
            raise InputError("the alpaca win rate needs an LLM judge: --judge openai:MODEL")
    elif judge:
        raise InputError(f"--judge is only used by --task alpaca; {task} is scored by exact match")
    name = model_label(model, model_name)
    manifest = {"task": task, "model": name, "backend": backend, "judge": judge_obj.name if judge_obj else None,
                "max_new_tokens": max_new_tokens, "template": template, "system": system, "dtype": dtype, "n": len(rows),
                "data_sha256": text_sha256([r["question"] + "\x00" + r.get("gold", "") + "\x00" + r.get("reference", "") for r in rows])}
    run = RunDir(out, manifest)
    run.check()
    done = run.read_rows(lambda r: r.get("index"))
    todo = [i for i in range(len(rows)) if i not in done]
    if todo:
        from tqdm import tqdm

        target = make_backend(backend, model, tokenizer, batch_size, max_new_tokens, template, system, dtype, base_url)
        bar = tqdm(total=len(rows), initial=len(done), desc=task, unit="row", disable=None if progress is None else not progress)
        try:
            for idx, responses in target.generate_iter([GenInput(rows[i]["question"]) for i in todo]):
                for j, response in zip(idx, responses):
                    i = todo[j]
                    row = {"task": task, "index": i, "question": rows[i]["question"], "response": response,
                           **_score(task, rows[i], response, i, judge_obj)}
                    run.append(row)
                    done[i] = row
                    bar.update(1)
        finally:
            bar.close()
            run.close()

    scored = [done[i] for i in range(len(rows))]
    metric = {"gsm8k": "accuracy", "mmlu": "accuracy", "alpaca": "win_rate"}[task]
    values = [r[metric] for r in scored if r.get(metric) is not None]
    score = round(sum(values) / len(values), 4) if values and len(values) == len(scored) else None
    summary = {"task": task, "metric": metric, "score": score, "n": len(scored), "model": name,
               "judge": manifest["judge"]}
    write_json(run.dir / "summary.json", summary)
    write_text(run.dir / "report.md", _report(summary))
    return summary


def _score(task: str, row: dict, response: str, index: int, judge) -> dict:
    if task == "gsm8k":
        pred = gsm8k_prediction(response)
        return {"gold": row["gold"], "prediction": pred, "accuracy": float(pred == row["gold"])}
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
    score = "-" if summary["score"] is None else f"{100 * summary['score']:.1f}"
    what = {"accuracy": "accuracy (%)", "win_rate": "win rate (%) against the reference outputs"}[summary["metric"]]
    note = "" if summary["score"] is not None else "\nNo score: generation only (no reference outputs / judge).\n"
    return (f"# Helpfulness: {summary['task']}\n\n| Model | {summary['task']} |\n|---|---|\n"
            f"| {Path(summary['model']).name} | {score} |\n\n{what}, n = {summary['n']}"
            f"{', judge `' + summary['judge'] + '`' if summary['judge'] else ''}.\n{note}")
