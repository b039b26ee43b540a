"""OpenAI-compatible endpoints, through the maintained `openai` SDK: the judges' and the closed-model baselines' client.

The base URL comes from the argument or OPENAI_BASE_URL, the key from OPENAI_API_KEY; the key is sent in a
header and never printed, nor is a user:password in the URL. The URL is checked before use (http or https, a
host, no control characters). The SDK retries 408/409/429/5xx, timeouts and dropped connections, honours
Retry-After, and drops the Authorization header on a redirect to another origin; over all its attempts a request
gets DEADLINE seconds, with a line on stderr while it waits long. Replies whose content is a list of parts
(newer servers) are read as their text.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit, urlunsplit

from derta.inference.base import Backend, GenInput
from derta.io import InputError

RETRIES, BACKOFF, TIMEOUT = 4, 1.0, 120.0  # waits of 1, 2, 4, 8 s (or the server's Retry-After) before giving up
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # what the openai SDK retries (and any other 5xx)
DEADLINE, WAIT_NOTICE = 300.0, 30.0  # seconds: a request's total over its attempts; a line on stderr every so often


def redact_url(url: str) -> str:
    """`url` with any user:password@ replaced by ***@ (for messages)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def check_url(url: str) -> str:
    """An endpoint URL made safe to use: surrounding whitespace dropped (a copied line's \\r), and one line naming
    what is wrong (credentials redacted) when it is not an http(s) URL with a host."""
    url = url.strip()
    shown = redact_url(url)
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise InputError(f"--base-url {shown!r} holds a space or control character")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (a port that is not a number raises here)
    except ValueError as e:
        raise InputError(f"--base-url {shown!r} is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"--base-url {shown!r} is not an http(s) URL with a host (e.g. http://localhost:8000/v1)")
    return url


def reply_text(content, where: str) -> str:
    """A reply's message content as text: a string, a list of parts ({"type": "text", "text": ...}), or None."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = [p if isinstance(p, str) else p.get("text") for p in content if isinstance(p, (str, dict))]
        if all(isinstance(t, str) for t in texts) and len(texts) == len(content):
            return "".join(texts)
    raise InputError(f"{where}: the reply's content is {type(content).__name__}, not text")


def _sdk_client(base_url: str, key: str, timeout: float, retries: int, backoff: float):
    """The maintained `openai` SDK's client, with derta's backoff base (tests shorten it).

    The SDK retries 408/409/429/5xx, timeouts and dropped connections, honours Retry-After, and sends
    requests through httpx, which drops the Authorization header on a redirect to another origin.
    """
    import openai

    class Client(openai.OpenAI):
        def _calculate_retry_timeout(self, remaining_retries, options, response_headers):
            retry_after = self._parse_retry_after_header(response_headers)
            if retry_after is not None and 0 < retry_after <= 60:
                return retry_after
            limit = (
                options.get_max_retries(self.max_retries) if hasattr(options, "get_max_retries") else self.max_retries
            )
            return backoff * 2 ** min(limit - remaining_retries, 10)

    return Client(base_url=base_url, api_key=key, timeout=timeout, max_retries=retries)


class OpenAIClient:
    """An OpenAI-compatible API (chat and completions routes) through the `openai` SDK.

    The base URL comes from the argument or OPENAI_BASE_URL (it includes /v1, as in the openai SDK);
    the key from OPENAI_API_KEY ('EMPTY' when unset, what local servers such as vLLM accept). The
    key is sent in a header and never printed: it is scrubbed from every error message.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = TIMEOUT,
        retries: int | None = None,
        backoff: float | None = None,
        deadline: float = DEADLINE,
        wait_notice: float = WAIT_NOTICE,
    ):
        self.model = model
        url = check_url(base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1")
        self.base_url = url.rstrip("/")
        self.shown_url = redact_url(self.base_url)  # what messages say
        self._key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self._secrets = [x for x in (self._key, urlsplit(self.base_url).password) if x and x != "EMPTY"]
        self.retries = RETRIES if retries is None else retries
        self.deadline, self.wait_notice = deadline, wait_notice
        self._noticed = 0.0
        self._client = _sdk_client(
            self.base_url, self._key, min(timeout, deadline), self.retries, BACKOFF if backoff is None else backoff
        )

    def __repr__(self) -> str:
        return f"OpenAIClient(model={self.model!r}, base_url={self.shown_url!r})"

    def _scrub(self, text: str) -> str:
        # Scrub before cutting to length: a cut through the key would leave a prefix that no longer matches.
        text = text.replace(self.base_url, self.shown_url)
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return " ".join(text.split())[:300]

    def post(self, route: str, payload: dict) -> dict:
        """The reply to one request, within `deadline` seconds over all its attempts; a line on stderr every
        `wait_notice` seconds while it waits."""
        box: dict = {}
        done = threading.Event()

        def call() -> None:
            try:
                box["reply"] = self._post(route, payload)
            except BaseException as e:  # handed to the waiting thread
                box["error"] = e
            finally:
                done.set()

        # A daemon thread: a request abandoned at the deadline must not keep the process from exiting.
        threading.Thread(target=call, daemon=True, name="derta-request").start()
        start = time.monotonic()
        while not done.wait(max(min(self.wait_notice, self.deadline - (time.monotonic() - start)), 0.0)):
            waited = time.monotonic() - start
            if waited >= self.deadline:
                raise InputError(
                    f"no answer from {self.shown_url}/{route} within {self.deadline:g} s over "
                    f"{self.retries + 1} attempts: the server takes requests but does not reply"
                )
            self._say_waiting(route, waited)
        if "error" in box:
            raise box["error"]
        return box["reply"]

    def _say_waiting(self, route: str, waited: float) -> None:
        now = time.monotonic()
        if now - self._noticed >= self.wait_notice:  # one line per interval, however many requests wait
            self._noticed = now
            print(
                f"derta: still waiting for {self.shown_url}/{route}: {waited:.0f} s so far (giving up at "
                f"{self.deadline:g} s)",
                file=sys.stderr,
            )

    def _post(self, route: str, payload: dict) -> dict:
        import openai

        try:  # the HTTP library the SDK is built on (httpx2 since openai 3, httpx before)
            import httpx2 as httpx
        except ImportError:
            import httpx

        url = f"{self.shown_url}/{route}"
        try:
            r = self._client.post(f"/{route}", cast_to=httpx.Response, body=payload)
            body = r.read()
        except openai.APIStatusError as e:
            code = e.status_code
            tries = self.retries + 1 if code in RETRY_STATUS or code >= 500 else 1
            raise InputError(f"HTTP {code} from {url} (attempt {tries}): {self._scrub(e.response.text)}") from None
        except openai.APIConnectionError as e:  # timeouts included
            reason = e.__cause__ or e
            raise InputError(
                f"cannot reach {url} after {self.retries + 1} attempts: "
                f"{self._scrub(str(reason) or type(reason).__name__)}"
            ) from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(
                f"{url} answered with something other than JSON: {self._scrub(body.decode('utf-8', 'replace'))}"
            ) from None

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, extra: dict | None = None) -> str:
        reply = self.post(
            "chat/completions",
            {
                "model": self.model,
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": temperature,
                **(extra or {}),
            },
        )
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{self.shown_url}/chat/completions: reply has no choices[0].message.content") from None
        return reply_text(content, f"{self.shown_url}/chat/completions")

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, extra: dict | None = None) -> str:
        reply = self.post(
            "completions",
            {
                "model": self.model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": temperature,
                **(extra or {}),
            },
        )
        try:
            text = reply["choices"][0]["text"]
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{self.shown_url}/completions: reply has no choices[0].text") from None
        return reply_text(text, f"{self.shown_url}/completions")


class OpenAIBackend(Backend):
    """Chat inputs go to /chat/completions (a prefill becomes a final assistant message), raw inputs to /completions.

    Servers differ on continuing a final assistant message: vLLM needs
    extra={"continue_final_message": true, "add_generation_prompt": false}; OpenAI's own API has no prefill.
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        batch_size: int = 16,
        max_new_tokens: int = 256,
        system: str | None = None,
        concurrency: int = 4,
        extra: dict | None = None,
        client: OpenAIClient | None = None,
    ):
        self.client = client or OpenAIClient(model, base_url, api_key)
        self.batch_size, self.max_new_tokens, self.system = batch_size, max_new_tokens, system
        self.concurrency, self.extra = concurrency, extra

    def _one(self, inp: GenInput) -> str:
        if not inp.chat:
            return self.client.complete(inp.text + inp.prefill, self.max_new_tokens, extra=self.extra)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": inp.text}
        ]
        if inp.prefill:
            messages.append({"role": "assistant", "content": inp.prefill})
        return self.client.chat(messages, self.max_new_tokens, extra=self.extra)

    def batches(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        # A backtracking model's [RESET] reaches Backend.generate_iter only if the server keeps special tokens
        # (vLLM: extra {"skip_special_tokens": false}); else the text before it cannot be told apart.
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for start in range(0, len(inputs), self.batch_size):
                idx = list(range(start, min(start + self.batch_size, len(inputs))))
                yield idx, list(pool.map(self._one, [inputs[i] for i in idx]))
