"""`derta data distill`: helpful rows whose responses the model being tuned writes itself.

    derta data distill --model M [--prompts FILE] --out anchors.jsonl

Safety-tuning a chat model on a few hundred refusals and short synthetic answers teaches it a new
style and a shortcut ("a word like kill or steal -> refuse"). Its own greedy answers to ordinary and
look-alike prompts are the best record of what it should keep doing (Qi et al. distil their anchor
set from the aligned model the same way); `data build --helpful anchors.jsonl` takes the output as is.

The default prompts (`prompts/benign_prompts.jsonl`) were written for this project: everyday
questions, how-tos, writing, coding and facts, and look-alikes that use a harmful-sounding word
harmlessly (homonyms, figures of speech, safe targets, safe contexts, definitions, history, fiction,
public facts). None come from XSTest or any other benchmark; those are for evaluation only.
`prompts/overrefusal_heldout.jsonl` is a separate held-out over-refusal set (safe look-alikes and
unsafe contrasts, XSTest format) that no training data is drawn from.

Dropped, and counted in the sidecar `<out>.distill.json`: responses that refuse (an anchor must
answer), that loop or are empty, and that hit the length cap mid-sentence (a cut answer would
teach the model to stop mid-sentence; `--trim-cut` keeps them up to their last finished sentence
instead). Generation is greedy and batched, in the run directory `<out>.parts/` (`eval.runner`):
a rerun continues from there, so nothing is lost or done twice.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from derta.data.sources import load_prompts
from derta.eval.refusal import degenerate, is_refusal
from derta.eval.runner import RunDir, ordered_rows, run_task, text_sha256
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend
from derta.io import InputError, loads, read_text, write_json, write_jsonl
from derta.models.precision import generation_precision
from derta.models.templates import encode_text

PROMPTS_DIR = Path(__file__).parent / "prompts"
BENIGN_PROMPTS = PROMPTS_DIR / "benign_prompts.jsonl"
HELDOUT_OVERREFUSAL = PROMPTS_DIR / "overrefusal_heldout.jsonl"

# A response that ends like this finished its thought; anything else that hit the cap was cut.
SENTENCE_END = tuple(".!?:;)]}\"'`*") + ("```",)
DISTILL_MAX_NEW_TOKENS = 128  # an anchor is a whole short answer; longer ones are trimmed or dropped


def builtin_prompts() -> list[str]:
    """The built-in benign prompts, in file order."""
    return load_prompts(BENIGN_PROMPTS)


def drop_reason(response: str, n_tokens: int, max_new_tokens: int) -> str | None:
    """Why a distilled response is not kept as an anchor ("refusal", "degenerate", "truncated"), or None."""

    if is_refusal(response):
        return "refusal"
    if degenerate(response) is not None:
        return "degenerate"
    if n_tokens >= max_new_tokens and not response.rstrip().endswith(SENTENCE_END):
        return "truncated"
    return None


def trim_to_sentence(response: str) -> str | None:
    """A cut response back to its last finished sentence, or None if not even one sentence finished."""
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)|\n\n", response)]
    return response[: ends[-1]].rstrip() if ends else None


def run_distill(
    model,
    prompts: list[str],
    out_path: str | os.PathLike,
    max_new_tokens: int = DISTILL_MAX_NEW_TOKENS,
    batch_size: int = 16,
    template: str = "auto",
    tokenizer=None,
    progress: bool | None = None,
    trim_cut: bool = False,
    allow_empty: bool = False,
    cpu_bf16: str = "off",
) -> dict:
    """Write `out_path` (JSONL {"instruction", "response"}) and its `.distill.json` sidecar; returns the sidecar.

    `model` is a path / hub ID, or a loaded model with its `tokenizer`. With `trim_cut`, an answer the
    length cap cut mid-sentence is kept up to its last finished sentence (counted as "trimmed")
    instead of dropped: chat models answer at length, and at 128 tokens SmolLM2 finished only about
    a third of its answers. The raw responses stay in the run directory `<out>.parts/` (resumable).
    Keeping no answer is one line saying why (unless `allow_empty`), not an empty file data build fails on.
    `cpu_bf16`: generation under bf16 autocast on a CPU (`models.precision`).
    """
    if not prompts:
        raise InputError("no prompts to distil")
    out_path = Path(out_path)
    sidecar = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".distill.json")
    run = RunDir(
        out_path.with_name(out_path.name + ".parts"), _settings(model, prompts, max_new_tokens, template, cpu_bf16)
    )
    settings = run.manifest  # with the model's fingerprint: a finished run of another model's is not reused
    run.check()
    if (previous := _finished(out_path, sidecar, {**settings, "trim_cut": trim_cut})) is not None:
        return previous
    resumed_from = len(run.read_rows(lambda r: r["index"]))
    started = time.time()

    generation = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, template=template, cpu_bf16=cpu_bf16)
    done = _generate(run, prompts, lambda: HFBackend(model, tokenizer, **generation), progress)
    kept, dropped, trimmed = _keep(ordered_rows(run, done, range(len(prompts))), max_new_tokens, trim_cut)
    if not kept and not allow_empty:
        raise InputError(nothing_kept(len(prompts), dropped))
    # Seconds spent generating in this invocation (a resumed run counts only its own part).
    summary = {
        **settings,
        "trim_cut": trim_cut,
        "batch_size": batch_size,
        "kept": len(kept),
        "trimmed": trimmed,
        "dropped": dropped,
        "resumed_from": resumed_from,
        "seconds": round(time.time() - started, 1),
    }
    write_jsonl(out_path, kept)
    write_json(sidecar, summary)
    return summary


def _generate(run: RunDir, prompts: list[str], make_backend, progress) -> dict:
    """Each prompt's response and its length in tokens, appended to `run` batch by batch (resumable)."""
    return run_task(
        run,
        [(i, GenInput(p)) for i, p in enumerate(prompts)],
        make_backend,
        lambda batch, texts, backend: [
            {"index": i, "prompt": inp.text, "response": text, "n_tokens": len(encode_text(backend.tokenizer, text))}
            for (i, inp), text in zip(batch, texts)
        ],
        desc="distil",
        progress=progress,
    )


# Why a response was dropped, and what keeps more of them.
DROP_FIXES = {
    "truncated": "the length cap cut them mid-sentence: raise --max-new-tokens or add --trim-cut",
    "refusal": "the model refused them: give prompts it answers (--prompts)",
    "degenerate": "they were empty or repeated themselves: check --template and the model",
}


def nothing_kept(n: int, dropped: dict) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in dropped.items() if v)
    reason = max(dropped, key=dropped.get)
    return f"data distill kept none of {n} responses ({counts}), so it wrote nothing; {DROP_FIXES[reason]}"


def _settings(model, prompts: list[str], max_new_tokens: int, template: str, cpu_bf16: str) -> dict:
    """What a distillation run is (its run directory's manifest): a resume with other settings is refused."""
    return generation_precision(cpu_bf16) | {
        "model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
        "n_prompts": len(prompts),
        "prompts_sha256": text_sha256(prompts),
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy",
        "template": template,
    }


def _finished(out_path: Path, sidecar: Path, settings: dict) -> dict | None:
    """The sidecar of a run that already finished with these settings, else None."""
    if not (out_path.is_file() and sidecar.is_file()):
        return None
    previous = loads(read_text(sidecar), sidecar)
    if not isinstance(previous, dict):
        raise InputError("not a data distill summary (a JSON object)", sidecar)
    return previous if {k: previous.get(k) for k in settings} == settings else None


def _keep(rows: list[dict], max_new_tokens: int, trim_cut: bool) -> tuple[list[dict], dict, int]:
    """The anchors among the distilled responses, the drop counts by reason, and how many were trimmed."""
    kept, dropped, trimmed = [], {"refusal": 0, "degenerate": 0, "truncated": 0}, 0
    for row in rows:
        response = row["response"].strip()
        reason = drop_reason(response, row["n_tokens"], max_new_tokens)
        if reason == "truncated" and trim_cut and (cut := trim_to_sentence(response)):
            reason, response, trimmed = None, cut, trimmed + 1
        if reason:
            dropped[reason] += 1
        else:
            kept.append({"instruction": row["prompt"], "response": response})
    return kept, dropped, trimmed
