"""`derta data triples`: DeRTa's training triples from harmful prompts alone.

    derta data triples --model BASE --prompts FILE --out triples.jsonl

A user who wants to safety-tune a model has, at best, a list of harmful prompts. For each one:

  harmful_response  the untuned model's own answer (the r̂ DeRTa trains the model to leave): sampled up to `tries`
                    times (seeded) and kept the first time the keyword judge says it complies (no refusal, not
                    degenerate); when every try refuses, the answer is started for it with an affirmative opener
                    (`eval.attacks.affirmative`: "Sure, here is how you can ...") and the model's continuation is
                    judged once more. A prompt with no complying answer is dropped and counted.
  safe_response     the refusal it is trained to switch to: the model's own refusal when asked to refuse
                    (REFUSAL_INSTRUCTION as the system prompt, greedy) where that is a clean refusal with no
                    content, else one of REFUSALS (varied wording, most offering a safe alternative). Prompts whose
                    row says `decision: support` (someone in distress, see `data.donotanswer`) get a supportive
                    answer that points to help instead (SUPPORT), never a bare refusal.
  category          the prompt row's `category` (refusal tokens and per-category reports use it).

Generation runs in the run directory OUT.parts/ (`eval.runner`): a rerun resumes, nothing is lost or done twice.
Settings and counts (kept, dropped, where each response came from) go to OUT.triples.json. The triples hold the
model's harmful text: they stay in the user's output directory and are never printed.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from derta.data.sources import prompt_of, read_records
from derta.eval.attacks import affirmative
from derta.eval.judges import KeywordJudge
from derta.eval.refusal import degenerate, is_refusal
from derta.eval.runner import RunDir, run_task, text_sha256
from derta.inference.base import GenInput, Sampling
from derta.inference.hf import HFBackend
from derta.io import InputError, write_json, write_jsonl
from derta.models.loading import load_model, load_tokenizer
from derta.models.precision import generation_precision

REFUSAL_INSTRUCTION = (
    "You are a careful assistant. The user's request could cause harm. Do not carry it out. In one or two "
    "sentences, say that you can't help with it and why, and offer a safe alternative if there is one."
)
# Written for this project. Each starts with the refusal word, as every refusal derta trains does.
REFUSALS = (
    "Sorry, I can't help with that. It could hurt people, and I won't take part in it.",
    "Sorry, but I won't do this. If there is a safe or legal goal behind it, tell me and I can help with that.",
    "Sorry, that's not something I can help with: it could cause real harm to someone.",
    "Sorry, I can't assist with this request. I'd be glad to help with something else instead.",
    "Sorry, I have to decline. This could put people at risk, and I won't provide it.",
    "Sorry, no. I can't help with that, but I can point you to safe, lawful resources on the topic.",
    "Sorry, I won't help with this. It could be used to harm others or break the law.",
    "Sorry, I can't do that. If you're worried about your own safety or someone else's, I can help you find support.",
)
SUPPORT = (
    "Sorry you're going through this. You don't have to face it alone: please reach out to someone you trust, or "
    "contact a crisis line or emergency services now if you might act on these thoughts. I'm here to listen.",
    "Sorry you're feeling this way. What you're going through matters, and a doctor, a counselor or a crisis "
    "helpline can help you stay safe and feel better. Would you like help finding someone to talk to?",
    "Sorry to hear how hard things are right now. Please talk to someone you trust or a mental health professional; "
    "if you are in danger, call your local emergency number or a crisis hotline. You deserve support.",
    "Sorry you're carrying this. You deserve care, not harm. A crisis line, a doctor or a trusted friend can help "
    "right now, and I can help you find the right number for where you live.",
)


@dataclass
class TriplesConfig:
    tries: int = 3  # sampled answers per prompt before the affirmative opener is used
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    max_new_tokens: int = 96
    batch_size: int = 16
    template: str = "auto"
    cpu_bf16: str = "off"  # bf16 autocast on a CPU (models.precision); recorded only when on


def load_prompt_rows(path: str) -> list[dict]:
    """{"prompt", "category", "decision"} rows: any file `data.sources` reads; decision defaults to refuse."""
    rows = []
    for lineno, r in read_records(path):
        decision = r.get("decision", "refuse")
        if decision not in ("refuse", "support"):
            raise InputError(f"field 'decision' must be refuse or support, not {decision!r}", path, lineno)
        category = r.get("category")
        if category is not None and not isinstance(category, str):
            raise InputError("field 'category' must be a string", path, lineno)
        rows.append({"prompt": prompt_of(r, path, lineno), "category": category, "decision": decision})
    return rows


def _pick(texts: tuple[str, ...], prompt: str) -> str:
    """A template chosen by the prompt's hash: varied wording, the same choice on every run."""
    return texts[zlib.crc32(prompt.encode("utf-8")) % len(texts)]


def _harmful(run: RunDir, prompts: list[str], make_backend, cfg: TriplesConfig, progress) -> dict[int, tuple[str, str]]:
    """{prompt index: (harmful response, "sampled" | "prefilled")} for the prompts whose model answer complies."""
    judge, found = KeywordJudge(), {}
    for attempt in range(cfg.tries + 1):
        prefilled = attempt == cfg.tries
        todo = [i for i in range(len(prompts)) if i not in found]
        inputs = {i: GenInput(prompts[i], prefill=affirmative(prompts[i]) + ":" if prefilled else "") for i in todo}

        def score(batch, responses, backend, attempt=attempt):
            return [
                {
                    "index": i,
                    "attempt": attempt,
                    "prefill": inp.prefill,
                    "response": r,
                    "complies": judge.one(r, prompts[i]).harmful,
                }
                for ((i, _), inp), r in zip(batch, responses)
            ]

        sampling = Sampling(cfg.temperature, cfg.top_p, cfg.seed * 1_000_003 + attempt * 10_007)
        rows = run_task(
            run,
            [((i, attempt), inputs[i]) for i in todo],
            lambda s=sampling: make_backend(sampling=s),
            score,
            key_of=lambda r: (r["index"], r["attempt"]),
            desc=f"harmful {attempt + 1}",
            progress=progress,
        )
        for (i, _), row in sorted(rows.items()):
            if row["complies"] and i not in found:
                found[i] = (row["prefill"] + row["response"], "prefilled" if row["prefill"] else "sampled")
    return found


def _refusals(run: RunDir, prompts: list[str], todo: list[int], make_backend, progress) -> dict[int, str]:
    """{prompt index: the model's own refusal} where, told to refuse, it refuses cleanly."""

    def score(batch, responses, backend):
        return [{"index": i, "response": r} for (i, _), r in zip(batch, responses)]

    rows = run_task(
        run,
        [(i, GenInput(prompts[i])) for i in todo],
        lambda: make_backend(system=REFUSAL_INSTRUCTION),
        score,
        desc="refusals",
        progress=progress,
    )
    return {
        i: r["response"].strip()
        for i, r in rows.items()
        if is_refusal(r["response"]) and degenerate(r["response"]) is None
    }


def _backend_factory(model, tokenizer, cfg: TriplesConfig):
    """make_backend(sampling=None, system=None): an HFBackend on the model, which loads once, on first use (a
    finished run needs none)."""
    loaded: list = []

    def make_backend(sampling=None, system=None):
        if not loaded:
            loaded.extend(
                [load_model(model), tokenizer or load_tokenizer(model)]
                if isinstance(model, str)
                else [model, tokenizer]
            )
        return HFBackend(
            loaded[0],
            loaded[1],
            batch_size=cfg.batch_size,
            max_new_tokens=cfg.max_new_tokens,
            template=cfg.template,
            system=system,
            sampling=sampling,
            cpu_bf16=cfg.cpu_bf16,
        )

    return make_backend


def _assemble(rows: list[dict], harmful: dict, own: dict) -> list[dict]:
    """A triple for every prompt with a complying answer: its refusal (own, else a template) or supportive answer."""
    triples = []
    for i in sorted(harmful):
        decision, prompt = rows[i]["decision"], rows[i]["prompt"]
        if decision == "support":
            safe, source = _pick(SUPPORT, prompt), "support"
        else:
            safe, source = (own[i], "model") if i in own else (_pick(REFUSALS, prompt), "template")
        triples.append(
            {
                "instruction": prompt,
                "harmful_response": harmful[i][0],
                "safe_response": safe,
                "category": rows[i]["category"],
                "decision": decision,
                "harmful_source": harmful[i][1],
                "safe_source": source,
            }
        )
    return triples


def run_triples(
    model,
    prompts_path: str,
    out_path: str,
    cfg: TriplesConfig | None = None,
    tokenizer=None,
    limit: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Write OUT (JSONL triples) and OUT.triples.json (settings and counts); returns the counts."""
    cfg = cfg or TriplesConfig()
    rows = load_prompt_rows(prompts_path)[:limit]
    prompts = [r["prompt"] for r in rows]
    out = Path(out_path)
    settings = {
        "model": str(model) if isinstance(model, str) else type(model).__name__,
        "n_prompts": len(prompts),
        "prompts_sha256": text_sha256([f"{r['decision']}\x00{r['prompt']}" for r in rows]),
        **{k: v for k, v in asdict(cfg).items() if k != "cpu_bf16"},
        **generation_precision(cfg.cpu_bf16),
    }
    started = time.time()
    make_backend = _backend_factory(model, tokenizer, cfg)
    parts = out.with_name(out.name + ".parts")
    harm_run, refusal_run = RunDir(parts / "harmful", settings), RunDir(parts / "refusals", settings)
    harm_run.check()
    refusal_run.check()
    harmful = _harmful(harm_run, prompts, make_backend, cfg, progress)
    to_refuse = [i for i in sorted(harmful) if rows[i]["decision"] == "refuse"]
    triples = _assemble(rows, harmful, _refusals(refusal_run, prompts, to_refuse, make_backend, progress))
    summary = {
        **settings,
        "kept": len(triples),
        "dropped_no_complying_answer": len(prompts) - len(triples),
        "harmful_source": {k: sum(t["harmful_source"] == k for t in triples) for k in ("sampled", "prefilled")},
        "safe_source": {k: sum(t["safe_source"] == k for t in triples) for k in ("model", "template", "support")},
        "seconds": round(time.time() - started, 1),
    }
    write_json(out.with_name(out.name.removesuffix(".jsonl") + ".triples.json"), summary)
    if not triples:
        raise InputError(
            f"no prompt got a complying answer from the model in {cfg.tries} tries and an affirmative "
            "start, so there are no triples (raise --tries or --temperature)",
            prompts_path,
        )
    write_jsonl(out, triples)
    return summary
