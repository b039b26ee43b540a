"""Self-distilled anchors: helpful rows whose responses the model being tuned writes itself.

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
instead). Generation is greedy and batched; a run appends each batch to `<out>.parts/` and a rerun
continues from there, so nothing is lost or done twice.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from .io import InputError, read_jsonl, write_json, write_jsonl

PROMPTS_DIR = Path(__file__).parent / "prompts"
BENIGN_PROMPTS = PROMPTS_DIR / "benign_prompts.jsonl"
HELDOUT_OVERREFUSAL = PROMPTS_DIR / "overrefusal_heldout.jsonl"

# A response that ends like this finished its thought; anything else that hit the cap was cut.
SENTENCE_END = tuple(".!?:;)]}\"'`*") + ("```",)


def builtin_prompts() -> list[str]:
    """The built-in benign prompts, in file order."""
    return [r["prompt"] for r in read_jsonl(BENIGN_PROMPTS, required=("prompt",))]


def heldout_overrefusal_path() -> Path:
    return HELDOUT_OVERREFUSAL


def load_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompts from JSONL rows with `prompt` (or `instruction`)."""
    out = []
    for lineno, row in read_jsonl(path, with_lines=True):
        text = row.get("prompt", row.get("instruction"))
        if not isinstance(text, str) or not text.strip():
            raise InputError("row needs a non-empty string 'prompt' (or 'instruction')", path, lineno)
        out.append(text)
    if not out:
        raise InputError("file has no prompts", path)
    return out


def drop_reason(response: str, n_tokens: int, max_new_tokens: int) -> str | None:
    """Why a distilled response is not kept as an anchor ("refusal", "degenerate", "truncated"), or None."""
    from .judges import degenerate, is_refusal

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
    return response[:ends[-1]].rstrip() if ends else None


def run_distill(model, prompts: list[str], out_path: str | os.PathLike, max_new_tokens: int = 128, batch_size: int = 16,
                template: str = "auto", tokenizer=None, progress: bool = True, trim_cut: bool = False) -> dict:
    """Write `out_path` (JSONL {"instruction", "response"}) and its `.distill.json` sidecar; returns the sidecar.

    `model` is a path / hub ID, or a loaded model with its `tokenizer`. With `trim_cut`, an answer the
    length cap cut mid-sentence is kept up to its last finished sentence (counted as "trimmed")
    instead of dropped: chat models answer at length, and at 128 tokens SmolLM2 finished only about
    a third of its answers.
    """
    from .evaluate import RunDir, text_sha256
    from .generate import GenInput, HFBackend
    from .models import encode_text

    if not prompts:
        raise InputError("no prompts to distil")
    out_path = Path(out_path)
    sidecar = out_path.with_name(out_path.name.removesuffix(".jsonl") + ".distill.json")
    settings = {"model": str(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__,
                "n_prompts": len(prompts), "prompts_sha256": text_sha256(prompts), "max_new_tokens": max_new_tokens,
                "decoding": "greedy", "template": template}
    if out_path.is_file() and sidecar.is_file():
        import json

        previous = json.loads(sidecar.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in settings} == settings and previous.get("trim_cut") == trim_cut:
            return previous  # finished earlier with the same settings
    run = RunDir(out_path.with_name(out_path.name + ".parts"), settings, "responses.jsonl")
    run.check()
    done = run.read_rows(lambda r: r["index"])
    todo = [i for i in range(len(prompts)) if i not in done]
    started = time.time()
    if todo:
        backend = HFBackend(model, tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens, template=template)
        stream = backend.generate_iter([GenInput(prompts[i]) for i in todo])
        if progress:
            from tqdm import tqdm

            stream = tqdm(stream, total=-(-len(todo) // batch_size), desc="distil", unit="batch")
        try:
            for idx, texts in stream:
                for j, text in zip(idx, texts):
                    i = todo[j]
                    row = {"index": i, "prompt": prompts[i], "response": text,
                           "n_tokens": len(encode_text(backend.tokenizer, text))}
                    run.append(row)
                    done[i] = row
        finally:
            run.close()
    kept, dropped, trimmed = [], {"refusal": 0, "degenerate": 0, "truncated": 0}, 0
    for i in range(len(prompts)):
        row = done[i]
        response = row["response"].strip()
        reason = drop_reason(response, row["n_tokens"], max_new_tokens)
        if reason == "truncated" and trim_cut and (cut := trim_to_sentence(response)):
            reason, response, trimmed = None, cut, trimmed + 1
        if reason:
            dropped[reason] += 1
        else:
            kept.append({"instruction": row["prompt"], "response": response})
    # Seconds spent generating in this invocation (a resumed run counts only its own part).
    summary = {**settings, "trim_cut": trim_cut, "batch_size": batch_size, "kept": len(kept), "trimmed": trimmed, "dropped": dropped,
               "resumed_from": len(prompts) - len(todo), "seconds": round(time.time() - started, 1)}
    write_jsonl(out_path, kept)
    write_json(sidecar, summary)  # the raw responses stay in <out>.parts/ for audit and re-filtering
    return summary
