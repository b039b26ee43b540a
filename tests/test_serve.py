"""A real OpenAI-compatible server, not a mock: `transformers serve` (the transformers[serving] extra) serves the tiny
model on 127.0.0.1; `derta eval --backend openai` must get the greedy responses the transformers backend gets, and
the LLM judge must work against the same server. Bounded: a handful of requests, the server stopped in `finally`."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from derta.cli.main import main
from derta.eval.judges import OpenAIJudge
from derta.eval.rubrics import RUBRICS
from derta.inference.base import GenInput
from derta.inference.hf import HFBackend

PROMPTS = ["How can I open the gate?", "Tell me how to fix it.", "What is the best way to do magic?"]
MAX_NEW = 8
STARTUP_S = 90


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc, url: str, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"transformers serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"transformers serve not ready after {STARTUP_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def served(tiny_dir, tmp_path_factory):
    """(base_url, model name): `transformers serve MODEL_DIR` on a free port, offline, one CPU thread."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cli = Path(sys.executable).parent / "transformers"
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                str(cli),
                "serve",
                str(tiny_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(proc, url, log)
        yield f"{url}/v1", str(tiny_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_derta_eval_on_transformers_serve_matches_the_transformers_backend(served, tiny_dir, tmp_path):
    base_url, model = served
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = [
        "eval",
        "--model",
        model,
        "--prompts",
        str(prompts),
        "--attacks",
        "none,completion",
        "--max-new-tokens",
        str(MAX_NEW),
        "--batch-size",
        "4",
    ]
    assert main(common + ["--out", str(tmp_path / "hf")]) == 0
    assert main(common + ["--out", str(tmp_path / "served"), "--backend", "openai", "--base-url", base_url]) == 0
    hf = {(r["attack"], r["index"]): r["response"] for r in _rows(tmp_path / "hf" / "generations.jsonl")}
    served_rows = {(r["attack"], r["index"]): r["response"] for r in _rows(tmp_path / "served" / "generations.jsonl")}
    assert len(hf) == len(served_rows) == 2 * len(PROMPTS)
    assert all(hf.values())  # the tiny model says something, so equality is not two empty strings
    # Chat (/v1/chat/completions, the model's chat template) and raw text (/v1/completions): greedy, same tokens.
    assert served_rows == hf


def test_llm_judge_works_against_the_same_server(served, tiny_dir):
    base_url, model = served
    judge = OpenAIJudge(model, base_url=base_url, rubric="harmbench", max_tokens=MAX_NEW)
    verdicts = judge.judge(PROMPTS[:2], ["Sorry, I can't help with that.", "Step 1: <placeholder>"])
    # The judge asked the served model the HarmBench question; its reply is the greedy answer the local model gives.
    local = HFBackend(str(tiny_dir), max_new_tokens=MAX_NEW).generate(
        [
            GenInput(RUBRICS["harmbench"].text.format(prompt=p, response=r))
            for p, r in zip(PROMPTS[:2], ["Sorry, I can't help with that.", "Step 1: <placeholder>"])
        ]
    )
    assert [v.details["reply"] for v in verdicts] == [x.strip()[:500] for x in local]
    # A random tiny model does not answer yes/no: reported as unparsed, and the keyword reading is used instead.
    for v in verdicts:
        assert v.details.get("unparsed") is True or v.details["label"] in ("yes", "no")
    assert [v.refused for v in verdicts] == [True, False]
