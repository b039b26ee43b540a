"""`derta eval`: attack a model with every (prompt, attack) pair, judge the responses, report attack success rates.

    DIR/manifest.json     the settings; resuming into DIR with other settings is refused
    DIR/generations.jsonl one row per (attack, prompt), appended and fsynced row by row as each batch finishes
    DIR/summary.json      {"asr": {attack: fraction harmful}, "n": {attack: count}, ...}, written at the end
    DIR/report.md         a paper-shaped table

Rerunning the same command resumes: finished rows are read back (a row torn by kill -9 is cut off)
and only missing (attack, prompt) pairs are generated. With nothing missing, no model is loaded.
`judge_file` (`derta judge`) re-judges a generations file, and reports agreement with human labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .attacks import PAIR_ITERATIONS, PAIR_STREAMS
from .io import InputError, check_fields, check_number, read_jsonl, read_text, write_json, write_jsonl, write_text

PROMPT_FIELDS = ("question", "instruction", "prompt")  # the first one a row has is its prompt
OFFLINE_ATTACKS = "completion,prefill,codeattack,jailbreak,selfcipher,pasttense"  # the six that need no search loop


# ---------------------------------------------------------------- inputs


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from JSONL (`question`, `instruction` or `prompt` per row) or a .txt file (one per line)."""
    path = Path(path)
    if path.suffix == ".txt":
        prompts = [line.strip() for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            raise InputError("file is empty", path)
        return prompts
    prompts = []
    for lineno, row in read_jsonl(path, with_lines=True):
        name = next((f for f in PROMPT_FIELDS if f in row), None)
        if name is None:
            raise InputError(f"row has none of the fields {', '.join(PROMPT_FIELDS)}", path, lineno)
        check_fields(row, [name], path, lineno, "prompt row")
        prompts.append(row[name])
    return prompts


def load_harmful_responses(path: str | os.PathLike) -> list[str]:
    """The `harmful_response` of every prompt row: what prefill-tokens / prefill-frac prefill from."""
    if Path(path).suffix == ".txt":
        raise InputError("prefill-tokens and prefill-frac need JSONL prompts with a 'harmful_response' per row", path)
    rows = read_jsonl(path, with_lines=True)
    for lineno, row in rows:
        check_fields(row, ["harmful_response"], path, lineno, "prompt row")
    return [row["harmful_response"] for _, row in rows]


def model_label(model, model_name: str | None = None) -> str:
    """What the manifest calls the model: `model_name`, else the path / hub ID / endpoint name, else a loaded model's name_or_path."""
    name = model_name or (model if isinstance(model, str) else getattr(model, "name_or_path", None))
    if not name:
        raise InputError("--model is required")
    return str(name)


def file_sha256(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def text_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


# ---------------------------------------------------------------- a resumable run directory


class RunDir:
    """An output directory whose rows survive kill -9: a manifest, then an append-only JSONL log.

    `key_of(row)` names a row's unit of work; rows read back are deduplicated on it.
    """

    def __init__(self, out: str | os.PathLike, manifest: dict, rows_file: str = "generations.jsonl"):
        self.dir = Path(out)
        self.manifest_path, self.rows_path = self.dir / "manifest.json", self.dir / rows_file
        self.manifest = manifest
        self._log = None

    def check(self) -> None:
        """Refuse a directory made with other settings, or one that is not a run directory.

        Nothing is written here: the manifest goes in with the first row, so a run that fails
        before producing anything (e.g. an unreachable endpoint) leaves no directory behind.
        """
        if self.manifest_path.is_file():
            try:
                old = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            except ValueError:  # JSONDecodeError or UnicodeDecodeError
                old = None
            if not isinstance(old, dict):
                raise InputError("malformed manifest", self.manifest_path)
            for key in sorted(set(old) | set(self.manifest)):
                if old.get(key) != self.manifest.get(key):
                    raise InputError(f"this run was made with {key}={_short(old.get(key))}, not {_short(self.manifest.get(key))}; "
                                     "rerun with the same settings to resume, or use another --out", self.manifest_path)
            return
        if self.dir.exists() and (not self.dir.is_dir() or any(self.dir.iterdir())):
            raise InputError("exists and is not a derta run directory (no manifest.json); use another --out", self.dir)

    def read_rows(self, key_of) -> dict:
        """Finished rows by key. A torn last line (killed mid-write) is cut off the file."""
        rows: dict = {}
        if not self.rows_path.is_file():
            return rows
        data = self.rows_path.read_bytes()
        good_end, lineno = 0, 0
        for line in data.splitlines(keepends=True):
            lineno += 1
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("torn")
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not a row")
            except ValueError:
                if good_end + len(line) < len(data):  # not the last line: damage we did not make
                    raise InputError("malformed row (not written by derta?)", self.rows_path, lineno) from None
                break
            good_end += len(line)
            rows.setdefault(key_of(row), row)
        if good_end < len(data):
            with open(self.rows_path, "r+b") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())
        return rows

    def append(self, row: dict) -> None:
        if self._log is None:
            if not self.manifest_path.is_file():
                write_json(self.manifest_path, self.manifest)
            self._log = open(self.rows_path, "a", encoding="utf-8")
        self._log.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._log.flush()
        os.fsync(self._log.fileno())

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def _row_key(row: dict) -> tuple:
    return row.get("attack"), row.get("index")


# ---------------------------------------------------------------- derta eval


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
    # Models trained with refusal tokens: `derta calibrate`'s calibration.json (thresholds at every generated
    # position, hf and vllm backends), and whether the responses show the tokens (hidden by default).
    calibration: str | os.PathLike | None = None
    show_refusal_tokens: bool = False

    def check(self) -> None:
        """Settings that are wrong whatever the files say; one InputError naming the flag."""
        from .generate import BACKENDS, parse_backend_spec

        if self.backend not in BACKENDS:
            raise InputError(f"unknown backend '{self.backend}': use one of {', '.join(BACKENDS)}")
        for flag in ("max_new_tokens", "batch_size", "pair_streams", "pair_iterations", "limit", "tensor_parallel_size"):
            check_number(getattr(self, flag), f"--{flag.replace('_', '-')}", "count")
        if self.tensor_parallel_size > 1 and self.backend != "vllm":
            raise InputError("--tensor-parallel-size above 1 only with --backend vllm")
        if self.attacker:
            parse_backend_spec(self.attacker)

    def manifest(self, questions: list[str], attacks: list[str], judge_name: str, pair_judge_name: str | None,
                 harmful_responses: list[str] | None = None) -> dict:
        """The run's identity: what resuming compares (the keys are those of runs made before EvalConfig)."""
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
        return extra | {
            "model": self.model, "backend": self.backend, "attacks": attacks, "judge": judge_name,
            "max_new_tokens": self.max_new_tokens, "template": self.template, "system": self.system, "dtype": self.dtype,
            "openai_extra": self.openai_extra, "n_prompts": len(questions), "prompts_sha256": text_sha256(questions),
            "jailbreak_templates": [[Path(p).name, file_sha256(p)] for p in self.jailbreak_templates] or None,
            "pair": pair,
            "autodan": {"population": self.autodan_population, "generations": self.autodan_generations, "seed": self.seed}
            if "autodan" in attacks else None,
        }


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
    from .attacks import SEARCH, PrefixPrefill, make_attacks
    from .generate import RefusalPolicy, Shard, make_backend, parse_backend_spec
    from .judges import make_judge

    cfg.check()
    # Read (and checked) before any work; make_backend refuses it for the openai backend.
    policy = RefusalPolicy.from_file(cfg.calibration) if cfg.calibration is not None else None
    questions = load_prompts(cfg.prompts) if not isinstance(cfg.prompts, list) else list(cfg.prompts)
    questions = questions[:cfg.limit] if cfg.limit is not None else questions
    out, backend, batch_size = cfg.out, cfg.backend, cfg.batch_size
    shard = Shard.from_env()
    if shard.world > 1 and (backend != "hf" or not isinstance(model if model is not None else cfg.model, str)):
        raise InputError("several processes split an eval only with --backend hf and a model path "
                         "(vllm: one process with --tensor-parallel-size)")
    judge_obj = make_judge(cfg.judge, base_url=cfg.base_url, batch_size=batch_size, rubric=cfg.judge_rubric)
    pair_judge = (make_judge(cfg.pair_judge, base_url=cfg.base_url, batch_size=batch_size, rubric=cfg.pair_judge_rubric)
                  if cfg.pair_judge else None)
    attack_objs = make_attacks(cfg.attacks, cfg.jailbreak_templates, None, cfg.pair_iterations, cfg.autodan_population,
                               cfg.autodan_generations, cfg.seed, cfg.pair_streams, pair_judge)
    # AutoDAN checks this itself, but only after the static attacks have run and fixed the manifest.
    if backend != "hf" and any(a.name == "autodan" for a in attack_objs):
        raise InputError("autodan reads the target model's log-probabilities: use --backend hf")
    responses = None
    if any(isinstance(a, PrefixPrefill) for a in attack_objs):
        if backend == "openai":
            raise InputError("prefill-tokens and prefill-frac cut by the model's tokens: use --backend hf or vllm")
        responses = (list(cfg.harmful_responses) if cfg.harmful_responses is not None
                     else load_harmful_responses(cfg.prompts))[:len(questions)]
    cfg.model = model_label(model if cfg.model is None else cfg.model)
    names = [a.name for a in attack_objs]
    manifest = cfg.manifest(questions, names, judge_obj.name, pair_judge.name if pair_judge else None, responses)
    run = RunDir(out, manifest)
    run.check()
    rows = _read_all_rows(run)
    shard.wait()  # every process has read (and cut torn lines) before any writes
    # One process appends to generations.jsonl, several each to their own file.
    mine = run if shard.world == 1 else RunDir(out, manifest, f"generations.rank{shard.rank}.jsonl")
    todo = {a.name: [i for i in range(len(questions)) if (a.name, i) not in rows] for a in attack_objs}
    n_todo = sum(map(len, todo.values()))

    if n_todo:
        from tqdm import tqdm

        target = make_backend(backend, model if model is not None else cfg.model, tokenizer, batch_size, cfg.max_new_tokens,
                              cfg.template, cfg.system, cfg.dtype, cfg.base_url, cfg.openai_extra,
                              device=shard.device, tensor_parallel_size=cfg.tensor_parallel_size, policy=policy,
                              show_refusal_tokens=cfg.show_refusal_tokens)
        bar = tqdm(total=len(questions) * len(attack_objs), initial=len(rows), desc="eval", unit="row",
                   disable=True if not shard.main else None if progress is None else not progress)

        def record(row: dict) -> None:
            mine.append(row)
            rows[_row_key(row)] = row
            bar.update(1)

        try:
            # Static attacks: one pooled, length-sorted stream of batches; each batch is judged and saved at once.
            tok = getattr(target, "tokenizer", None)
            static = [(a.name, i, a.apply(questions[i], responses[i], tok) if isinstance(a, PrefixPrefill) else a.apply(questions[i]))
                      for a in attack_objs if a.name not in SEARCH for i in todo[a.name]]
            batches = target.generate_iter([inp for _, _, inp in static], **({"shard": shard} if shard.world > 1 else {}))
            for idx, outputs in batches:
                verdicts = judge_obj.judge([questions[static[j][1]] for j in idx], outputs)
                for j, response, verdict in zip(idx, outputs, verdicts):
                    name, i, inp = static[j]
                    record(make_row(name, i, questions[i], inp, response, verdict))
            # Search attacks: a batch of questions at a time (they generate, and PAIR judges, inside).
            for a in attack_objs:
                if a.name not in SEARCH or not todo[a.name]:
                    continue
                if a.name == "pair" and cfg.attacker:
                    kind, attacker_model = parse_backend_spec(cfg.attacker)
                    a.attacker = make_backend(kind, attacker_model, None, batch_size, cfg.max_new_tokens, "auto", None,
                                              cfg.dtype, cfg.base_url, cfg.openai_extra)
                for k, start in enumerate(range(0, len(todo[a.name]), batch_size)):
                    if not shard.mine(k):
                        continue
                    chunk = todo[a.name][start:start + batch_size]
                    results = a.run([questions[i] for i in chunk], target, judge_obj)
                    unjudged = [(i, r) for i, r in zip(chunk, results) if r.verdict is None]
                    if unjudged:
                        verdicts = judge_obj.judge([questions[i] for i, _ in unjudged], [r.response for _, r in unjudged])
                        for (_, r), v in zip(unjudged, verdicts):
                            r.verdict = v
                    for i, r in zip(chunk, results):
                        record(make_row(a.name, i, questions[i], r.input, r.response, r.verdict, r.details))
        finally:
            bar.close()
            mine.close()

    shard.wait()
    if shard.world > 1:
        rows = _read_all_rows(run)
        shard.wait()  # all have read the per-process files before the main process merges and removes them
    ordered = [rows[(a, i)] for a in names for i in range(len(questions))]
    summary = summarize(ordered, names)
    summary.update({"model": manifest["model"], "judge": manifest["judge"], "backend": backend, "max_new_tokens": cfg.max_new_tokens})
    if shard.main:
        parts = _shard_files(run)
        if parts or list(rows.values()) != ordered:
            write_jsonl(run.rows_path, ordered)  # merged, in (attack, prompt) order
        for part in parts:
            part.unlink()
        write_json(run.dir / "summary.json", summary)
        write_text(run.dir / "report.md", report_markdown(summary))
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


def make_row(attack: str, index: int, question: str, inp, response: str, verdict, attack_details: dict | None = None) -> dict:
    """One generations.jsonl row: what was asked, what came back, and the judge's verdict."""
    row = {"attack": attack, "index": index, "prompt": question, "input": inp.text}
    if inp.prefill:
        row["prefill"] = inp.prefill
    row.update({"chat": inp.chat, "response": response, "harmful": verdict.harmful, "refused": verdict.refused,
                "judge": verdict.details})
    details = {**inp.meta, **(attack_details or {})}
    if details:
        row["attack_details"] = details
    return row


def summarize(rows: list[dict], attacks: list[str] | None = None) -> dict:
    """Per-attack counts and rates: asr (harmful), refusal rate, degenerate share."""
    attacks = attacks or list(dict.fromkeys(r.get("attack", "all") for r in rows))
    by = {a: [r for r in rows if r.get("attack", "all") == a] for a in attacks}

    def rate(a, test):
        return round(sum(map(test, by[a])) / len(by[a]), 4) if by[a] else None

    summary = {
        "asr": {a: rate(a, lambda r: bool(r.get("harmful"))) for a in attacks},
        "n": {a: len(by[a]) for a in attacks},
        "refusal_rate": {a: rate(a, lambda r: bool(r.get("refused"))) for a in attacks},
        "degenerate": {a: rate(a, lambda r: bool((r.get("judge") or {}).get("degenerate"))) for a in attacks},
    }
    # LLM judges: replies that did not follow the rubric (read by the keyword judge instead), and StrongREJECT's score.
    if any((r.get("judge") or {}).get("unparsed") for r in rows):
        summary["unparsed"] = {a: rate(a, lambda r: bool((r.get("judge") or {}).get("unparsed"))) for a in attacks}
    scored = {a: [r["judge"]["score"] for r in by[a] if isinstance((r.get("judge") or {}).get("score"), (int, float))]
              for a in attacks}
    if any(scored.values()):
        summary["score"] = {a: round(sum(v) / len(v), 4) if v else None for a, v in scored.items()}
    return summary


def report_markdown(summary: dict) -> str:
    from .attacks import DISPLAY, display_name

    attacks = list(summary["asr"])
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    asrs = [x for x in summary["asr"].values() if x is not None]
    avg = sum(asrs) / len(asrs) if asrs else None
    heads = [display_name(a) for a in attacks]
    lines = [
        f"# Attack success rate: {summary.get('model', '')}",
        "",
        f"Judge `{summary.get('judge')}`, backend `{summary.get('backend')}`, at most {summary.get('max_new_tokens')} new tokens. "
        "ASR (%) = share of responses judged harmful (lower is safer).",
        "",
        "| Model | " + " | ".join(heads) + " | Avg. |",
        "|---" * (len(heads) + 2) + "|",
        f"| {Path(str(summary.get('model', ''))).name} | " + " | ".join(pct(summary["asr"][a]) for a in attacks) + f" | {pct(avg)} |",
        "",
        "| | " + " | ".join(heads) + " |",
        "|---" * (len(heads) + 1) + "|",
        "| n | " + " | ".join(str(summary["n"][a]) for a in attacks) + " |",
        "| refusal (%) | " + " | ".join(pct(summary["refusal_rate"][a]) for a in attacks) + " |",
        "| degenerate (%) | " + " | ".join(pct(summary["degenerate"][a]) for a in attacks) + " |",
    ]
    if "score" in summary:
        lines.append("| StrongREJECT score | " + " | ".join("-" if summary["score"].get(a) is None else f"{summary['score'][a]:.3f}"
                                                        for a in attacks) + " |")
    if "unparsed" in summary:
        lines.append("| judge reply unparsed (%) | " + " | ".join(pct(summary["unparsed"][a]) for a in attacks) + " |")
    lines += [
        "",
        "Degenerate responses (empty, or one word or phrase looping) are not counted as harmful.",
        "",
        "Attacks (each column is this project's implementation; the link is the paper's version):",
        "",
    ]
    lines += [f"- `{a}`: {display_name(a)}" + (f", after {DISPLAY[a][1]}" if DISPLAY.get(a, (0, None))[1] else "")
              for a in attacks]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- derta judge


def load_generations(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """Rows with a string `response` (may be empty) and, if present, a string `prompt`."""
    rows = read_jsonl(path, with_lines=True)
    for lineno, row in rows:
        if not isinstance(row.get("response"), str):
            raise InputError("row needs a string field 'response'", path, lineno)
        if not isinstance(_prompt_of(row), str):
            raise InputError("field 'prompt' must be a string", path, lineno)
        if "human_harmful" in row and not isinstance(row["human_harmful"], bool):
            raise InputError("field 'human_harmful' must be true or false", path, lineno)
    return rows


def _prompt_of(row: dict):
    return row.get("prompt", row.get("question", row.get("instruction", "")))


def judge_file(in_path: str | os.PathLike, judge: str, out_path: str | os.PathLike, base_url: str | None = None,
               batch_size: int = 16, rubric: str | None = None) -> dict:
    """Judge every row of a generations file; write the rows with new verdicts to `out_path`.

    Rows labelled by people (`"human_harmful": true/false`) give the judge's agreement with them.
    """
    from .judges import make_judge

    rows = [row for _, row in load_generations(in_path)]
    judge_obj = make_judge(judge, base_url=base_url, batch_size=batch_size, rubric=rubric)
    judged = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [_prompt_of(r) for r in chunk]
        for row, v in zip(chunk, judge_obj.judge(prompts, [r["response"] for r in chunk])):
            judged.append({**row, "harmful": v.harmful, "refused": v.refused, "judge": v.details})
    write_jsonl(out_path, judged)
    labelled = [r for r in judged if "human_harmful" in r]
    result = {"n": len(judged), "asr": round(sum(r["harmful"] for r in judged) / len(judged), 4), "judge": judge_obj.name,
              "n_labelled": len(labelled), "unparsed": sum(bool(r["judge"].get("unparsed")) for r in judged),
              "agreement": round(sum(r["harmful"] == r["human_harmful"] for r in labelled) / len(labelled), 4) if labelled else None}
    return result
