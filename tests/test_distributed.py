"""Several processes compute what one does: DDP training and data-parallel evaluation on CPU (gloo, torchrun).

Each run starts two real processes with `python -m torch.distributed.run --nproc_per_node 2` on a free
local port, one thread each, on the tiny model; the one-process reference runs in this process.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from derta.cli.main import main

TORCHRUN_TIMEOUT = 900  # seconds: generous, for a two-core machine shared with other jobs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """`derta ARGV` in `nproc` processes on this machine (gloo on CPU), one thread per process."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "derta",
        *argv,
    ]
    # Its own process group, so a run that hangs is ended with its workers, not just the launcher.
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TORCHRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-4000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("dist")
    for name, rows in (("safety", synthetic.harmful_train[:8]), ("helpful", synthetic.helpful_train[:8])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "derta",
                "--safety",
                str(root / "safety.jsonl"),
                "--helpful",
                str(root / "helpful.jsonl"),
                "--out",
                str(root / "rows.jsonl"),
            ]
        )
        == 0
    )
    return root


# ---------------------------------------------------------------- training


STEPS = 4  # 24 rows, 8 a step: the fourth step is in the second epoch (a new shuffle)


def train_argv(model, data, out, batch_size):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        str(batch_size),
        "--grad-accum",
        "1",
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--save-steps",
        "1000",
        "--cpu-bf16",
        "off",  # the equality is float32 arithmetic's: bf16 rounding differs with the batch's shape
        "--quiet",
    ]


def run_info(out):
    return json.loads((out / "derta_train.json").read_text())


@pytest.fixture(scope="module")
def one_vs_two(small_data, tiny_dir):
    """The same run as 1 process x batch 8 and as 2 processes x batch 4."""
    one, two = small_data / "one", small_data / "two"
    assert main(train_argv(tiny_dir, small_data / "rows.jsonl", one, 8)) == 0
    torchrun(train_argv(tiny_dir, small_data / "rows.jsonl", two, 4))
    return one, two


def test_two_processes_train_the_same_loss_and_weights_as_one(one_vs_two):
    one, two = (run_info(d) for d in one_vs_two)
    assert one["steps"] == two["steps"] == STEPS
    assert (one["processes"], two["processes"]) == (1, 2)
    l1, l2 = ([h["loss"] for h in info["log_history"]] for info in (one, two))
    assert len(l1) == len(l2) == STEPS
    # Before the fix the two-process loss (and its gradients) was half the one-process one.
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-4, (l1, l2)
    assert l1[-1] < l1[0]  # it trained: equal losses are not two runs that did nothing
    w1, w2 = (load_file(str(d / "model.safetensors")) for d in one_vs_two)
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_logged_parts_are_gathered_over_processes(one_vs_two):
    one, two = (run_info(d)["log_history"] for d in one_vs_two)
    for h1, h2 in zip(one, two):
        # Token counts are the whole step's, not one process's half.
        assert h1["mle_tokens"] == h2["mle_tokens"] > 0 and h1["rto_tokens"] == h2["rto_tokens"] > 0
        for key in ("mle_loss", "rto_loss", "rto_accuracy"):
            assert abs(h1[key] - h2[key]) <= 2e-4, (key, h1, h2)  # both rounded to 4 places


# ---------------------------------------------------------------- evaluation


def eval_argv(model, prompts, out):
    return [
        "eval",
        "--model",
        str(model),
        "--prompts",
        str(prompts),
        "--attacks",
        "completion,prefill",
        "--out",
        str(out),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
    ]


@pytest.fixture(scope="module")
def prompts(small_data, synthetic):
    path = small_data / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in synthetic.harmful_test[:7]))
    return path


def test_two_processes_evaluate_to_the_same_bytes_as_one(small_data, tiny_dir, prompts):
    one, two = small_data / "eval1", small_data / "eval2"
    assert main(eval_argv(tiny_dir, prompts, one)) == 0
    done = torchrun(eval_argv(tiny_dir, prompts, two))
    assert done.stdout.count("rows judged") == 1  # the main process reports; the other is quiet
    assert (two / "generations.jsonl").read_bytes() == (one / "generations.jsonl").read_bytes()
    assert (two / "summary.json").read_bytes() == (one / "summary.json").read_bytes()
    assert sorted(p.name for p in two.iterdir()) == ["generations.jsonl", "manifest.json", "report.md", "summary.json"]
    rows = [json.loads(line) for line in (one / "generations.jsonl").read_text().splitlines()]
    assert [(r["attack"], r["index"]) for r in rows] == [(a, i) for a in ("completion", "prefill") for i in range(7)]


def test_a_data_parallel_eval_resumes_from_the_per_process_files(small_data, tiny_dir, prompts):
    one, two = small_data / "eval1", small_data / "eval-resume"
    if not (one / "generations.jsonl").exists():
        assert main(eval_argv(tiny_dir, prompts, one)) == 0
    finished = (one / "generations.jsonl").read_text().splitlines(keepends=True)
    # As if killed: rank 0 had written two rows, rank 1 one row and half of the next.
    two.mkdir()
    (two / "manifest.json").write_bytes((one / "manifest.json").read_bytes())
    kept = [json.loads(line) for line in finished[:3]]
    for row in kept:
        row["response"] += " [kept from before]"  # a row read back, not generated again, keeps this mark
    (two / "generations.rank0.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept[:2]))
    (two / "generations.rank1.jsonl").write_text(json.dumps(kept[2], ensure_ascii=False) + "\n" + finished[3][:30])
    torchrun(eval_argv(tiny_dir, prompts, two))
    rows = [json.loads(line) for line in (two / "generations.jsonl").read_text().splitlines()]
    assert rows[:3] == kept and len(rows) == len(finished)
    assert [json.dumps(r) for r in rows[3:]] == [json.dumps(json.loads(line)) for line in finished[3:]]
    assert not list(two.glob("generations.rank*"))


def test_two_processes_probe_to_the_same_bytes_as_one(small_data, tiny_dir, synthetic):
    data = small_data / "probe.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic.harmful_test[:9]))
    argv = ["probe", "--model", str(tiny_dir), "--data", str(data), "--batch-size", "2"]
    assert main([*argv, "--out", str(small_data / "probe1.json")]) == 0
    torchrun([*argv, "--out", str(small_data / "probe2.json")])
    assert (small_data / "probe2.json").read_bytes() == (small_data / "probe1.json").read_bytes()
    assert json.loads((small_data / "probe1.json").read_text())["n_examples"] == 9


def test_vllm_backend_gets_the_tensor_parallel_size(small_data, tiny_dir, tiny_tokenizer, prompts, monkeypatch, capsys):
    """`derta eval --backend vllm --tensor-parallel-size 2` hands the size to vLLM's engine (a stand-in here: no GPU)."""
    import types

    engines = []

    class FakeLLM:
        def __init__(self, **kwargs):
            engines.append(kwargs)

        def get_tokenizer(self):
            return tiny_tokenizer

        def generate(self, prompts, params, use_tqdm=False):
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(text="I'm sorry, I can't help.")]) for _ in prompts
            ]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, SamplingParams=lambda **k: k))
    out = small_data / "eval-vllm"
    assert main([*eval_argv(tiny_dir, prompts, out), "--backend", "vllm", "--tensor-parallel-size", "2"]) == 0
    assert len(engines) == 1 and engines[0]["tensor_parallel_size"] == 2
    assert len((out / "generations.jsonl").read_text().splitlines()) == 14
    capsys.readouterr()
    assert main([*eval_argv(tiny_dir, prompts, small_data / "eval-tp-hf"), "--tensor-parallel-size", "2"]) == 2
    assert "--tensor-parallel-size" in capsys.readouterr().err
