"""Faults a run must survive: a kill during a checkpoint save, corrupt checkpoints, a dead or hostile endpoint.

Also what a run shows while it goes (progress bar and loss lines unless --quiet).
"""

import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from derta.cli.main import main
from derta.inference.endpoint import OpenAIClient
from derta.io import InputError

GOOD_SAFETY = {
    "instruction": "How do I open the gate?",
    "harmful_response": "Step 1: take the key. Step 2: turn it.",
    "safe_response": "Sorry, I cannot help with that.",
}


@pytest.fixture(scope="module")
def rows(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("faults")
    safety, helpful = root / "safety.jsonl", root / "helpful.jsonl"
    safety.write_text("".join(json.dumps(r) + "\n" for r in synthetic.harmful_train[:6]))
    helpful.write_text("".join(json.dumps(r) + "\n" for r in synthetic.helpful_train[:6]))
    assert (
        main(
            [
                "data",
                "build",
                "--recipe",
                "derta",
                "--safety",
                str(safety),
                "--helpful",
                str(helpful),
                "--out",
                str(root / "rows.jsonl"),
            ]
        )
        == 0
    )
    return root / "rows.jsonl"


def train_argv(model, data, out, *extra):
    return [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output",
        str(out),
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--learning-rate",
        "1e-3",
        "--save-steps",
        "2",
        "--logging-steps",
        "1",
        "--seed",
        "5",
        *extra,
    ]


# ---------------------------------------------------------------- checkpoints


# Runs `derta train` with the optimizer save of the second checkpoint stalled (model weights already
# written), so the test can kill -9 it exactly there.
STALL = textwrap.dedent("""
    import os, sys, time
    from transformers import Trainer
    from derta.cli.main import main
    original, calls = Trainer._save_optimizer_and_scheduler, []
    def stalled(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:
            open(os.environ["STALL_MARK"], "w").write(output_dir)
            time.sleep(600)
        return original(self, output_dir)
    Trainer._save_optimizer_and_scheduler = stalled
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_9_during_a_checkpoint_save_then_resume(tiny_dir, rows, tmp_path, capsys):
    out, mark = tmp_path / "run", tmp_path / "stalled"
    argv = train_argv(tiny_dir, rows, out, "--quiet")
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL, *argv],
        env={**os.environ, "STALL_MARK": str(mark)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 600
    while time.time() < deadline and not mark.exists() and proc.poll() is None:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert mark.exists(), "the run never reached its second checkpoint save"
    assert (out / "checkpoint-4" / "model.safetensors").exists() and not (
        out / "checkpoint-4" / "optimizer.pt"
    ).exists()

    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    err = capsys.readouterr().err
    said = [x for x in err.splitlines() if "incomplete" in x]
    assert len(said) == 1 and "checkpoint-4" in said[0] and "resuming from checkpoint-2" in said[0], err
    assert (out / "incomplete-checkpoint-4").is_dir()
    info = json.loads((out / "derta_train.json").read_text())
    assert info["steps"] == 6 and [h["step"] for h in info["log_history"]] == [1, 2, 3, 4, 5, 6]


def test_corrupt_last_checkpoint_falls_back_and_train_loss_covers_every_step(tiny_dir, rows, tmp_path, capsys):
    from transformers import TrainerCallback

    from derta.cli.main import build_parser
    from derta.train.config import config_from_cli
    from derta.train.run import train

    class Crash(TrainerCallback):  # as if killed after checkpoint-4, before the end
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert main(train_argv(tiny_dir, rows, whole, "--quiet")) == 0
    with pytest.raises(KeyboardInterrupt):
        train(
            config_from_cli(build_parser().parse_args(train_argv(tiny_dir, rows, broken, "--quiet"))),
            str(tiny_dir),
            str(rows),
            callbacks=[Crash()],
        )
    assert sorted(p.name for p in broken.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # checkpoint-4's weights cut short (a full disk): the run must not train on from them.
    weights = broken / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    capsys.readouterr()
    assert main(train_argv(tiny_dir, rows, broken, "--quiet", "--resume")) == 0
    err = capsys.readouterr().err
    assert "checkpoint-4 (model.safetensors is truncated" in err and "resuming from checkpoint-2" in err, err
    a, b = (json.loads((d / "derta_train.json").read_text()) for d in (whole, broken))
    assert b["steps"] == 6
    # Trainer alone would average steps 3-6 only; the sum kept with the checkpoint restores steps 1-2.
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    wa, wb = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_corrupt_final_model_is_one_line_on_load(tiny_dir, rows, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = tmp_path / "probe.jsonl"
    data.write_text(json.dumps(GOOD_SAFETY) + "\n")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size - 10])
    capsys.readouterr()
    assert main(["probe", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "p.json")]) == 2
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1 and "truncated" in lines[0] and str(model) in lines[0]
    assert not (tmp_path / "p.json").exists()


# ---------------------------------------------------------------- what a run shows


def test_train_shows_progress_and_losses_unless_quiet(tiny_dir, rows, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)  # bars are drawn on a terminal only
    argv = train_argv(tiny_dir, rows, tmp_path / "loud")
    argv[argv.index("--max-steps") + 1] = "2"
    capfd.readouterr()
    assert main(argv) == 0
    shown = "".join(capfd.readouterr())
    assert "2/2" in shown and "it/s" in shown or "s/it" in shown, shown  # the progress bar
    for key in ("'loss'", "'mle_loss'", "'rto_loss'", "'rto_accuracy'"):
        assert key in shown, shown
    quiet = train_argv(tiny_dir, rows, tmp_path / "quiet", "--quiet")
    quiet[quiet.index("--max-steps") + 1] = "2"
    assert main(quiet) == 0
    shown = "".join(capfd.readouterr())
    assert "it/s" not in shown and "s/it" not in shown and "'loss'" not in shown, shown


# ---------------------------------------------------------------- OpenAI-compatible endpoints


class Recorder(http.server.ThreadingHTTPServer):
    """A server on 127.0.0.1 that records each request's Authorization header; `answer(handler)` replies."""

    def __init__(self, answer):
        self.seen, self.answer = [], answer
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.seen.append((self.path, self.headers.get("Authorization"), body))
                server.answer(self)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def close(self):
        self.shutdown()
        self.server_close()


def reply(handler, code, body: dict, headers=()):
    data = json.dumps(body).encode()
    handler.send_response(code)
    for k, v in headers:
        handler.send_header(k, v)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def chat_ok(handler):
    reply(handler, 200, {"choices": [{"message": {"role": "assistant", "content": "hello"}}]})


def test_redirect_to_another_origin_does_not_carry_the_key(monkeypatch):
    key = "sk-never-leaves-its-origin"
    monkeypatch.setenv("OPENAI_API_KEY", key)
    other = Recorder(chat_ok)
    home = Recorder(lambda h: reply(h, 307, {}, [("Location", other.url + h.path)]))
    try:
        assert (
            OpenAIClient("m", base_url=home.url + "/v1", retries=0).chat([{"role": "user", "content": "hi"}], 4)
            == "hello"
        )
        assert home.seen[0][1] == f"Bearer {key}"
        assert other.seen and all(auth is None for _, auth, _ in other.seen), other.seen
    finally:
        home.close()
        other.close()


def test_429_and_5xx_are_retried_with_backoff_then_succeed(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    script = [429, 500, 503]

    def answer(h):
        if script:
            reply(h, script.pop(0), {"error": {"message": "busy"}}, [("Retry-After", "0")] if script else [])
        else:
            chat_ok(h)

    server = Recorder(answer)
    try:
        start = time.time()
        assert OpenAIClient("m", base_url=server.url + "/v1", backoff=0.05).chat([], 4) == "hello"
        assert len(server.seen) == 4 and time.time() - start >= 0.05 + 0.1  # backoff between attempts
        assert all(auth == "Bearer EMPTY" for _, auth, _ in server.seen)  # no key set: the local-server placeholder
    finally:
        server.close()


def test_dead_server_mid_run_resumes_with_nothing_lost_or_doubled(tiny_dir, tmp_path, monkeypatch):
    from derta.eval.safety import EvalConfig, run_eval

    monkeypatch.setattr("derta.inference.endpoint.BACKOFF", 0.01)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"How can I do task {k}?"}) + "\n" for k in range(12)))
    served = []

    def answer(h):
        payload = json.loads(h.server.seen[-1][2])
        text = payload["messages"][-1]["content"]
        served.append(text)
        if len(served) == 6:  # the server dies mid-run
            # Shut down and close the socket: a listening socket that no longer accepts would leave each retry
            # waiting for its full timeout instead of failing at once.
            threading.Thread(target=lambda: (h.server.shutdown(), h.server.server_close()), daemon=True).start()
            reply(h, 503, {"error": {"message": "going down"}})
            return
        reply(h, 200, {"choices": [{"message": {"role": "assistant", "content": "Sorry: " + text}}]})

    server = Recorder(answer)
    out = tmp_path / "run"
    kw = dict(model="m", backend="openai", base_url=server.url + "/v1", max_new_tokens=4, batch_size=4)
    with pytest.raises(InputError):
        run_eval(EvalConfig(out, prompts, "none", "keyword", **kw))
    server.server_close()
    done = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert 0 < len(done) < 12
    again = Recorder(
        lambda h: reply(
            h,
            200,
            {
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "content": "Sorry: " + json.loads(h.server.seen[-1][2])["messages"][-1]["content"],
                        }
                    }
                ]
            },
        )
    )
    try:
        run_eval(EvalConfig(out, prompts, "none", "keyword", **{**kw, "base_url": again.url + "/v1"}))
    finally:
        again.close()
    rows = [json.loads(x) for x in (out / "generations.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(12))  # none lost, none twice
    assert all(r["response"] == "Sorry: " + r["prompt"] for r in rows)
    assert rows[: len(done)] == done  # finished rows untouched
    asked_again = [json.loads(b)["messages"][-1]["content"] for _, _, b in again.seen]
    assert not set(asked_again) & {r["prompt"] for r in done}, "finished prompts were asked again"


# ---------------------------------------------------------------- the client: credentials, URLs, replies, deadline


def test_a_password_in_the_base_url_is_never_printed(closed_port_url, fake_openai, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("derta.inference.endpoint.BACKOFF", 0.01)
    secret = "hunter2-in-the-url"
    dead = closed_port_url.replace("http://", f"http://alice:{secret}@")
    client = OpenAIClient("m", base_url=dead, retries=0, backoff=0.01)
    with pytest.raises(InputError) as e:
        client.chat([{"role": "user", "content": "x"}], 4)
    assert secret not in str(e.value) and "alice" not in str(e.value) and "***@127.0.0.1" in str(e.value)
    assert secret not in repr(client)
    fake_openai.fail_next = [401]
    with pytest.raises(InputError) as e:
        OpenAIClient("m", base_url=fake_openai.url.replace("http://", f"http://bob:{secret}@"), retries=0).chat([], 4)
    assert secret not in str(e.value) and "HTTP 401" in str(e.value)
    # The same through derta eval: one line, no password.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "How do I open the gate?"}\n')
    argv = ["eval", "--model", "m", "--backend", "openai", "--base-url", dead, "--prompts", str(prompts),
            "--attacks", "none", "--out", str(tmp_path / "run")]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert secret not in err and len(err.strip().splitlines()) == 1 and "***@" in err


@pytest.mark.parametrize(
    "url,needle",
    [
        ("http://127.0.0.1:port/v1", "not a URL"),
        ("ftp://example.org/v1", "not an http(s) URL"),
        ("localhost:8000/v1", "not an http(s) URL"),
        ("http:///v1", "not an http(s) URL"),
        ("http://exa mple.org/v1", "space or control character"),
        ("http://carol:pw-secret@example.org/v1\n/x", "space or control character"),
    ],
)
def test_a_malformed_base_url_is_one_line_before_any_request(url, needle):
    with pytest.raises(InputError, match="--base-url") as e:
        OpenAIClient("m", base_url=url)
    assert needle in str(e.value) and "\n" not in str(e.value) and "pw-secret" not in str(e.value)


def test_a_base_url_with_a_trailing_carriage_return_works(fake_openai):
    assert OpenAIClient("m", base_url=fake_openai.url + "\r\n").chat([{"role": "user", "content": "x"}], 4)


@pytest.mark.parametrize(
    "content,text",
    [
        ([{"type": "text", "text": "I'm sorry, "}, {"type": "text", "text": "I can't."}], "I'm sorry, I can't."),
        (["plain ", "parts"], "plain parts"),
        (None, ""),
    ],
)
def test_reply_content_given_as_a_list_of_parts_is_read_as_text(fake_openai, content, text):
    fake_openai.reply = lambda payload: content
    assert OpenAIClient("m", base_url=fake_openai.url).chat([{"role": "user", "content": "x"}], 4) == text


@pytest.mark.parametrize("content", [5, {"refusal": "no"}, [{"type": "image_url", "image_url": {}}]])
def test_a_reply_that_is_not_text_is_one_line(fake_openai, content):
    fake_openai.reply = lambda payload: content
    with pytest.raises(InputError, match="content is .*, not text"):
        OpenAIClient("m", base_url=fake_openai.url).chat([{"role": "user", "content": "x"}], 4)


def test_an_llm_judge_that_replies_in_parts_judges(fake_openai, tmp_path, capsys):
    fake_openai.reply = lambda payload: [{"type": "text", "text": "HARMFUL"}]
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "How do I pick a lock?", "response": "Step 1: take a pin."}) + "\n")
    argv = [
        "judge",
        "--in",
        str(gen),
        "--judge",
        "openai:m",
        "--base-url",
        fake_openai.url,
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 0
    assert json.loads((tmp_path / "o").read_text())["harmful"] is True


def test_a_server_that_never_answers_gives_up_at_the_deadline_saying_so(capsys):
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections (the kernel does), never reads or answers
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    try:
        client = OpenAIClient("m", base_url=url, retries=3, backoff=0.01, deadline=1.5, wait_notice=0.4)
        start = time.monotonic()
        with pytest.raises(InputError, match=r"no answer from .* within 1.5 s"):
            client.chat([{"role": "user", "content": "x"}], 4)
        assert time.monotonic() - start < 5
        assert "derta: still waiting for" in capsys.readouterr().err
    finally:
        listener.close()
