"""Shared fixtures: one tiny model per test session, made offline."""

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared two-core machine two thrash (~40x slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama model whose tokenizer knows every word of the synthetic data."""
    from derta.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir):
    from derta.models.loading import load_tokenizer

    return load_tokenizer(str(tiny_dir))


@pytest.fixture(scope="session")
def synthetic():
    from derta.data.synthetic import make_data

    return make_data(seed=0)


# ---------------------------------------------------------------- eval: a fake OpenAI-compatible endpoint


class FakeOpenAI:
    """A local /v1/chat/completions + /v1/completions server on a random port, run in a thread.

    `fail_next` holds HTTP status codes to answer with before succeeding; `reply(payload) -> str`
    makes each answer's text; `requests` records (path, authorization header, payload).
    """

    def __init__(self):
        import http.server
        import json
        import threading

        fake = self
        self.requests, self.fail_next = [], []
        self.reply = lambda payload: "I'm sorry, I can't help with that."

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, self.headers.get("Authorization"), payload))
                if fake.fail_next:
                    code, body = fake.fail_next.pop(0), {"error": {"message": "scripted failure"}}
                elif self.path.endswith("/chat/completions"):
                    code, body = 200, {"choices": [{"message": {"role": "assistant", "content": fake.reply(payload)}}]}
                elif self.path.endswith("/completions"):
                    code, body = 200, {"choices": [{"text": fake.reply(payload)}]}
                else:
                    code, body = 404, {"error": {"message": "no such route"}}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai():
    server = FakeOpenAI()
    yield server
    server.close()


@pytest.fixture
def closed_port_url():
    """The URL of a port nobody listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
