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
from .io import InputError, read_jsonl, write_json, write_jsonl, write_text

TASKS = ("gsm8k", "mmlu", "alpaca")
SCORED_TASKS = ("gsm8k", "mmlu")  # the tasks with an answer to extract (`derta score`)
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


# lm-evaluation-harness's gsm8k task stops generation at these; scoring cuts saved responses there too,
# so a model that goes on to invent the next "Question: ... #### 3" is scored on its own answer.
STOP_SEQUENCES = ("Question:", "</s>", "<|im_end|>")


def truncate_at_stops(response: str, stops=STOP_SEQUENCES) -> str:
    """The response up to the first stop sequence (what a generation with `until=stops` would have returned)."""
    cut = min((i for i in (response.find(s) for s in stops) if i >= 0), default=len(response))
    return response[:cut]


def gsm8k_strict(response: str) -> str | None:
    """lm-evaluation-harness's strict match: the FIRST "#### N" before any stop sequence, else None."""
    m = re.search(r"####\s*(" + _NUMBER + ")", truncate_at_stops(response))
    return _clean_number(m.group(1)) if m else None


def gsm8k_flexible(response: str) -> str | None:
    """lm-evaluation-harness's flexible extract: the LAST number before any stop sequence."""
    numbers = re.findall(_NUMBER, truncate_at_stops(response))
    return _clean_number(numbers[-1]) if numbers else None


def gsm8k_prediction(response: str) -> str | None:
    """The strict answer when there is one, else the flexible one (both after cutting at stop sequences)."""
    strict = gsm8k_strict(response)
    return strict if strict is not None else gsm8k_flexible(response)


def mmlu_letters(question: str) -> str:
    """The option letters a question offers ("-(A) ..." lines), A-D if none are marked."""
    letters = "".join(dict.fromkeys(re.findall(r"^\s*-?\(([A-Z])\)", question, re.MULTILINE)))
    return letters or "ABCD"


# An explicit answer statement: "the answer is (C)", "Answer: C", "the correct option is C", "correct choice: (B)".
# The letter must be a capital followed by no letter, so "the answer is a bit subtle" names no option.
_STATEMENT = (r"(?i:\b(?:answer|option|choice)\s*(?:is|would be|should be|will be|:)\s*:?\s*(?:option\s+|choice\s+)?)"
              r"\(?([{ls}])(?![A-Za-z0-9])")


def mmlu_prediction(response: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter, or None when the response does not commit to one. Strict on purpose:

    1. the first explicit statement: "answer is (C)", "Answer: C", "the correct option is (C)";
    2. a response that is only a letter, or opens with one marked as an option: "B", "(B) ...", "B. ...", "B) ...";
       an opening article ("A good question ...") is not an option;
    3. a parenthesized letter "(C)" when the response names exactly one such letter.
    Bare letters in prose ("I think B is plausible but ... D") are never guessed at: None.
    The response is first cut at stop sequences ("Question:"), as in lm-evaluation-harness.
    """
    text = truncate_at_stops(response)
    ls = "".join(re.escape(c) for c in letters)
    m = re.search(_STATEMENT.format(ls=ls), text)
    if m:
        return m.group(1)
    m = re.match(rf"\s*(?:\(([{ls}])\)|([{ls}])(?:[.):]|\s*$))", text)
    if m:
        return m.group(1) or m.group(2)
    marked = set(re.findall(rf"\(([{ls}])\)", text))
    return marked.pop() if len(marked) == 1 else None


# ---------------------------------------------------------------- MMLU by answer-letter log-likelihood

MMLU_ANSWER_PREFIX = "The answer is ("


def mmlu_loglik(backend, questions: list[str], prompt_format: str = "plain", answer_prefix: str = MMLU_ANSWER_PREFIX
                ) -> list[tuple[str, dict]]:
    """For each question, the option letter the model finds most likely, and every letter's log-probability.

    Like lm-evaluation-harness's multiple-choice MMLU: no generation; the question goes through the
    model's template, the assistant turn is started with `answer_prefix`, and each offered letter's
    tokens are scored after it (one batch of len(letters) sequences per question). `backend` is an
    `HFBackend` (its model, tokenizer, template and system prompt are used). Ties go to the first letter.
    """
    import torch

    from .generate import GenInput
    from .models import encode_text

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


# ---------------------------------------------------------------- prompt formats

# "plain": the question as written (the default). "paper": the DeRTa authors' evaluation script, which
# puts this text inside its [INST] template (use --template inst for models trained that way).
PROMPT_FORMATS = {
    "mmlu": {"plain": "{question}", "paper": "Choose the correct option for the given question.\n\n\n\nQuestion: {question}\n"},
    "gsm8k": {"plain": "{question}", "paper": "\n {question} \n "},
    "alpaca": {"plain": "{question}", "paper": "{question}"},
}


def format_prompt(task: str, question: str, prompt_format: str = "plain") -> str:
    """The text sent to the model for a question, in one of PROMPT_FORMATS[task]."""
    formats = PROMPT_FORMATS.get(task, {"plain": "{question}"})
    if prompt_format not in formats:
        raise InputError(f"unknown prompt format '{prompt_format}' for {task}: use one of {', '.join(formats)}")
    return formats[prompt_format].replace("{question}", question)


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
                dtype: str = "auto", base_url: str | None = None, limit: int | None = None, progress: bool | None = None,
                prompt_format: str = "plain", mmlu_method: str = "generate") -> dict:
    """Generate (resumably), score, write DIR/summary.json and DIR/report.md; returns the summary."""
    from .generate import GenInput, make_backend
    from .judges import OpenAIJudge, make_judge

    rows = load_task(task, data, reference)[:limit]
    format_prompt(task, "", prompt_format)  # an unknown format fails before any work
    if mmlu_method not in ("generate", "loglik"):
        raise InputError(f"unknown MMLU method '{mmlu_method}': use generate or loglik")
    if mmlu_method == "loglik" and (task != "mmlu" or backend != "hf"):
        raise InputError("answer-letter log-likelihood scoring is for --task mmlu with a local model (backend hf)")
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
    if prompt_format != "plain":  # (absent for defaults, so runs made before these options existed still resume)
        manifest["prompt_format"] = prompt_format
    if mmlu_method != "generate":
        manifest["mmlu_method"] = mmlu_method
    run = RunDir(out, manifest)
    run.check()
    done = run.read_rows(lambda r: r.get("index"))
    todo = [i for i in range(len(rows)) if i not in done]
    if todo:
        from tqdm import tqdm

        target = make_backend(backend, model, tokenizer, batch_size, max_new_tokens, template, system, dtype, base_url)
        bar = tqdm(total=len(rows), initial=len(done), desc=task, unit="row", disable=None if progress is None else not progress)
        try:
            if mmlu_method == "loglik":
                for i in todo:
                    [(pred, scores)] = mmlu_loglik(target, [rows[i]["question"]], prompt_format)
                    row = {"task": task, "index": i, "question": rows[i]["question"], "response": None,
                           "logprobs": scores, "gold": rows[i]["gold"], "prediction": pred,
                           "accuracy": float(pred == rows[i]["gold"])}
                    run.append(row)
                    done[i] = row
                    bar.update(1)
                todo = []
            for idx, responses in target.generate_iter([GenInput(format_prompt(task, rows[i]["question"], prompt_format)) for i in todo]):
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
    if task == "gsm8k":  # lm-evaluation-harness's flexible extract (last number), reported beside the strict score
        flex = [r.get("accuracy_flexible") for r in scored]
        summary["score_flexible"] = round(sum(flex) / len(flex), 4) if flex and None not in flex else None
    write_json(run.dir / "summary.json", summary)
    write_text(run.dir / "report.md", _report(summary))
    return summary


def _score(task: str, row: dict, response: str, index: int, judge) -> dict:
    if task == "gsm8k":
        strict, flexible = gsm8k_strict(response), gsm8k_flexible(response)
        return {"gold": row["gold"], "prediction": strict, "prediction_flexible": flexible,
                "accuracy": float(strict == row["gold"]), "accuracy_flexible": float(flexible == row["gold"])}
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
            f"{', judge `' + summary['judge'] + '`' if summary['judge'] else ''}.\n{note}"
            + (f"\nStrict match (first `#### N`); flexible match (last number): "
               f"{100 * summary['score_flexible']:.1f}.\n" if summary.get("score_flexible") is not None else ""))


# ---------------------------------------------------------------- re-scoring saved responses

GOLD_FIELDS = ("gold", "answer")


def score_file(task: str, in_path: str | os.PathLike, out_path: str | os.PathLike) -> dict:
    """`derta score`: re-score saved responses, as `derta judge` re-judges safety.

    Rows: {"response"} plus, optionally, the gold answer ("gold" or "answer": for gsm8k a number or a
    solution ending in "#### N", for mmlu a letter) and, for mmlu, the "question" (its option letters;
    A-D without it). Each row is written back with "extracted" (and for gsm8k "extracted_flexible"),
    and "correct" (/"correct_flexible") when it has a gold answer. Every row is checked before anything
    is written; a bad row is an InputError naming its line. Returns counts and accuracies.
    """
    if task not in SCORED_TASKS:
        raise InputError(f"unknown task '{task}' for scoring: use {' or '.join(SCORED_TASKS)}")
    rows = read_jsonl(in_path, required=("response",), with_lines=True)
    scored = []
    for lineno, row in rows:
        field = next((f for f in GOLD_FIELDS if f in row), None)
        gold = None
        if field is not None:
            value = row[field]
            if task == "gsm8k":
                gold = _clean_number(str(value).strip()) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
                if gold is None and isinstance(value, str):
                    gold = gsm8k_gold(value)
                if gold is None:
                    raise InputError(f"'{field}' must be a number or end in '#### NUMBER', got {_short_repr(value)}", in_path, lineno)
            else:
                letters = mmlu_letters(row["question"]) if isinstance(row.get("question"), str) else "ABCD"
                if not isinstance(value, str) or value.strip().upper() not in letters or len(value.strip()) != 1:
                    raise InputError(f"'{field}' must be one option letter among {letters}, got {_short_repr(value)}", in_path, lineno)
                gold = value.strip().upper()
        if "question" in row and not isinstance(row["question"], str):
            raise InputError("field 'question' must be a string", in_path, lineno)
        out = dict(row)
        if task == "gsm8k":
            out["extracted"], out["extracted_flexible"] = gsm8k_strict(row["response"]), gsm8k_flexible(row["response"])
            if gold is not None:
                out["correct"] = out["extracted"] == gold
                out["correct_flexible"] = out["extracted_flexible"] == gold
        else:
            letters = mmlu_letters(row["question"]) if isinstance(row.get("question"), str) else "ABCD"
            out["extracted"] = mmlu_prediction(row["response"], letters)
            if gold is not None:
                out["correct"] = out["extracted"] == gold
        scored.append(out)
    write_jsonl(out_path, scored)
    graded = [r for r in scored if "correct" in r]
    result = {"task": task, "n": len(scored), "n_gold": len(graded),
              "extracted": sum(r["extracted"] is not None for r in scored),
              "accuracy": round(sum(r["correct"] for r in graded) / len(graded), 4) if graded else None}
    if task == "gsm8k":
        result["accuracy_flexible"] = round(sum(r["correct_flexible"] for r in graded) / len(graded), 4) if graded else None
    return result


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
