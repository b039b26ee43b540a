"""OpenAI-compatible endpoints, through the maintained `openai` SDK: the judges' and the closed-model baselines' client.

The base URL comes from the argument or OPENAI_BASE_URL, the key from OPENAI_API_KEY; the key is sent in a
header and never printed. The SDK retries 408/409/429/5xx, timeouts and dropped connections, honours
Retry-After, and drops the Authorization header on a redirect to another origin.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from derta.inference.base import Backend, GenInput
from derta.io import InputError

RETRIES, BACKOFF, TIMEOUT = 4, 1.0, 120.0  # waits of 1, 2, 4, 8 s (or the server's Retry-After) before giving up
RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # what the openai SDK retries (and any other 5xx)


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
    ):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self._key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self.retries = RETRIES if retries is None else retries
        self._client = _sdk_client(
            self.base_url, self._key, timeout, self.retries, BACKOFF if backoff is None else backoff
        )

    def __repr__(self) -> str:
        return f"OpenAIClient(model={self.model!r}, base_url={self.base_url!r})"

    def _scrub(self, text: str) -> str:
        # Scrub before cutting to length: a cut through the key would leave a prefix that no longer matches.
        text = text.replace(self._key, "***") if self._key and self._key != "EMPTY" else text
        return " ".join(text.split())[:300]

    def post(self, route: str, payload: dict) -> dict:
        import openai

        try:  # the HTTP library the SDK is built on (httpx2 since openai 3, httpx before)
            import httpx2 as httpx
        except ImportError:
            import httpx

        url = f"{self.base_url}/{route}"
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
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{self.base_url}/chat/completions: reply has no choices[0].message.content") from None

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
            return reply["choices"][0]["text"] or ""
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{self.base_url}/completions: reply has no choices[0].text") from None


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

    def generate_iter(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for start in range(0, len(inputs), self.batch_size):
                idx = list(range(start, min(start + self.batch_size, len(inputs))))
                yield idx, list(pool.map(self._one, [inputs[i] for i in idx]))
