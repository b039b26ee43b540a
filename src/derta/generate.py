"""Generation backends: turn `GenInput`s into response texts.

A `GenInput` is what an attack produces: either a chat turn (instruction, formatted with the
model's template, optionally with the assistant turn already started by `prefill`) or raw text
to continue (no template). Backends are swappable behind one interface:

    backend.generate(inputs) -> responses, in input order
    backend.generate_iter(inputs) -> (input indices, responses) one batch at a time, so callers
                                     can save results as they finish

    HFBackend      transformers: batched, left-padded, longest first, greedy, KV cache, stops at EOS
    VLLMBackend    vLLM (the `vllm` extra, GPUs): same token ids as HFBackend, greedy
    OpenAIBackend  any OpenAI-compatible endpoint through the openai SDK (closed-model baselines)

Nothing here imports torch at module level: `derta eval` resuming a finished run never loads it.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

from .io import InputError
from .models import encode_prompt, encode_text, end_of_turn_ids, format_prompt

BACKENDS = ("hf", "vllm", "openai")


@dataclass(frozen=True)
class GenInput:
    """One generation request: a chat instruction (with optional assistant prefill) or raw text."""

    text: str
    prefill: str = ""  # the start of the assistant turn, e.g. "Sure, here is"; the response continues it
    chat: bool = True  # False: `text` is continued as is, with no chat template
    meta: dict = field(default_factory=dict, compare=False)  # what the attack wants recorded, e.g. a template name


def encode_input(tokenizer, inp: GenInput, template: str = "auto", system: str | None = None) -> list[int]:
    """Token ids of an input, segment by segment: prompt ids, then prefill ids (never re-tokenized as one string)."""
    if inp.chat:
        ids = encode_prompt(tokenizer, format_prompt(tokenizer, inp.text, template, system), template)
    else:
        ids = encode_prompt(tokenizer, inp.text, "raw")  # raw text gets the tokenizer's own BOS, if any
    return ids + encode_text(tokenizer, inp.prefill)


class Backend:
    """Common interface; subclasses implement `generate_iter`."""

    name = "backend"

    def generate_iter(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        raise NotImplementedError

    def generate(self, inputs: list[GenInput]) -> list[str]:
        return collect(self.generate_iter(inputs), len(inputs))


def collect(batches: Iterator[tuple[list[int], list[str]]], n: int) -> list[str]:
    """The texts of a `generate_iter`-style stream of (indices, texts), back in input order."""
    out = [""] * n
    for idx, texts in batches:
        for i, t in zip(idx, texts):
            out[i] = t
    return out


# ---------------------------------------------------------------- refusal tokens at inference


@dataclass
class RefusalPolicy:
    """How generation treats a model's refusal tokens (`data build --refusal-tokens`), at every generated position.

    `thresholds` {token: tau}: a refusal token is emitted exactly when its probability reaches its tau (the most
    decisive one, by p / tau, when several do), and is blocked otherwise, so tau alone sets how often the model
    refuses, per category. `biases` {token: b}: added to the token's logit first (a softer dial). Right after a
    refusal token the next token is held to the refusal transition of `refusal_phrase` ("Sorry" / " sorry", what
    every trained refusal continues with), so the visible text refuses whenever the token fires, even where the
    model never saw a refusal (a benign prompt). After that, refusal tokens are blocked: one decision per response.
    From `derta calibrate`'s calibration.json (`from_file`).
    """

    thresholds: dict[str, float] = field(default_factory=dict)
    biases: dict[str, float] = field(default_factory=dict)
    refusal_phrase: str = "Sorry"

    @classmethod
    def from_file(cls, path) -> "RefusalPolicy":
        from .io import read_text

        try:
            data = json.loads(read_text(path, "calibration file"))
        except json.JSONDecodeError as e:
            raise InputError(f"not JSON ({e.msg})", path, e.lineno) from None
        if not isinstance(data, dict) or not isinstance(data.get("thresholds", {}), dict) \
                or not isinstance(data.get("biases", {}), dict) or not (data.get("thresholds") or data.get("biases")):
            raise InputError("a calibration file has 'thresholds' (and/or 'biases'): {token: number}", path)
        for key in ("thresholds", "biases"):
            for token, value in data.get(key, {}).items():
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                    raise InputError(f"{key}: {token} must be a number, not {value!r}", path)
        phrase = data.get("refusal_phrase", "Sorry")
        if not isinstance(phrase, str) or not phrase.strip():
            raise InputError("refusal_phrase must be a non-empty string", path)
        return cls({k: float(v) for k, v in data.get("thresholds", {}).items()},
                   {k: float(v) for k, v in data.get("biases", {}).items()}, phrase)

    def tensors(self, tokenizer):
        """(ids, thresholds, biases) over the tokenizer's refusal tokens; a token the policy names must exist."""
        import torch

        from .models import refusal_tokens

        have = refusal_tokens(tokenizer)
        if not have:
            raise InputError("the model has no refusal tokens (train it on data build --refusal-tokens rows)")
        unknown = sorted((set(self.thresholds) | set(self.biases)) - set(have))
        if unknown:
            raise InputError(f"the calibration names tokens this model does not have: {', '.join(unknown)}")
        names = list(have)
        # A token without a threshold (a category calibration never saw) never fires on its own: tau above 1.
        tau = torch.tensor([self.thresholds.get(t, 2.0) for t in names]) if self.thresholds else None
        bias = torch.tensor([self.biases.get(t, 0.0) for t in names]) if self.biases else None
        return torch.tensor([have[t] for t in names]), tau, bias

    def follow_ids(self, tokenizer):
        """The tokens a refusal token must be followed by: the transition's start and mid forms."""
        import torch

        from .models import refusal_transition

        return torch.tensor(refusal_transition(tokenizer, self.refusal_phrase).ids)

    def for_tokenizer(self, tokenizer) -> tuple:
        """(ids, thresholds, biases, follow ids): what `apply_refusal_policy` takes, worked out once per model."""
        return (*self.tensors(tokenizer), self.follow_ids(tokenizer))


def apply_refusal_policy(scores, ids, thresholds=None, biases=None, done=None, follow=None, just=None):
    """Next-token scores (B, V) with a RefusalPolicy applied.

    `done` (B,): rows that already emitted a refusal token (refusal tokens blocked); `just` (B,): rows whose last
    token is one, whose next token is held to `follow` (the transition ids; the model picks among them).
    The one implementation behind the transformers LogitsProcessor and the vLLM adapter.
    """
    import torch

    ids = ids.to(scores.device)
    original = scores
    scores = scores.clone()
    if biases is not None:
        scores[:, ids] += biases.to(scores.device, scores.dtype)
    blocked = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device) if done is None else done.to(scores.device)
    if thresholds is not None:
        p = torch.softmax(scores.float(), dim=-1)[:, ids]
        tau = thresholds.to(scores.device, torch.float32)
        fire = (p >= tau) & ~blocked[:, None]
        rows = fire.any(-1)
        if rows.any():
            pick = ids[torch.where(fire, p / tau.clamp(min=1e-30), torch.tensor(-1.0, device=p.device)).argmax(-1)]
            forced = torch.full_like(scores, float("-inf"))
            forced[torch.arange(scores.shape[0], device=scores.device), pick] = 0.0
            scores = torch.where(rows[:, None], forced, scores)
        blocked = blocked | ~rows
    scores[blocked[:, None] & torch.isin(torch.arange(scores.shape[-1], device=scores.device), ids)[None, :]] = float("-inf")
    if follow is not None and just is not None and just.any():
        follow = follow.to(scores.device)
        held = torch.full_like(scores, float("-inf"))
        held[:, follow] = original[:, follow]
        scores = torch.where(just.to(scores.device)[:, None], held, scores)
    return scores


def refusal_logits_processor(parts: tuple, prompt_width: int):
    """A transformers LogitsProcessor applying a policy (`RefusalPolicy.for_tokenizer`'s parts); generated tokens
    start at column `prompt_width`."""
    from transformers import LogitsProcessor

    ids, tau, bias, follow = parts

    class RefusalTokenProcessor(LogitsProcessor):
        def __call__(self, input_ids, scores):
            import torch

            generated = input_ids[:, prompt_width:]
            marked = torch.isin(generated, ids.to(input_ids.device))
            just = marked[:, -1] if generated.shape[1] else None
            return apply_refusal_policy(scores, ids, tau, bias, marked.any(-1), follow, just)

    return RefusalTokenProcessor()


def visible_text(tokenizer, ids: list[int], show_refusal_tokens: bool = False) -> str:
    """Decoded response text; refusal tokens and [respond] (special tokens) are hidden unless `show_refusal_tokens`."""
    from .models import marker_tokens

    if not show_refusal_tokens:
        return tokenizer.decode(ids, skip_special_tokens=True)
    marks = {i: t for t, i in marker_tokens(tokenizer).items()}
    parts, start = [], 0
    for k, i in enumerate(ids):
        if i in marks:
            parts += [tokenizer.decode(ids[start:k], skip_special_tokens=True), marks[i]]
            start = k + 1
    return "".join(parts + [tokenizer.decode(ids[start:], skip_special_tokens=True)])


# ---------------------------------------------------------------- several processes (data parallel)


def launched_processes() -> str | None:
    """None in a single process; under torchrun / accelerate launch (WORLD_SIZE > 1), "gpu", or "cpu" on a machine
    without an accelerator (accelerate then needs to be told: it would otherwise run each process alone)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch

    accel = getattr(torch, "accelerator", None)
    return "gpu" if (accel.is_available() if accel is not None else torch.cuda.is_available()) else "cpu"


@dataclass
class Shard:
    """This process's share of a data-parallel run: batch k belongs to rank k % world.

    From the launcher's environment (torchrun, accelerate launch: WORLD_SIZE > 1); `state` is accelerate's
    PartialState then (it joins the process group: gloo on CPU, nccl on GPUs). One process: rank 0 of 1.
    """

    rank: int = 0
    world: int = 1
    state: object = None

    @classmethod
    def from_env(cls) -> "Shard":
        if not launched_processes():
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=launched_processes() == "cpu")
        return cls(state.process_index, state.num_processes, state)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> str | None:
        return None if self.state is None else str(self.state.device)

    def mine(self, k: int) -> bool:
        return k % self.world == self.rank

    def wait(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def gather(self, items: list) -> list:
        """Every process's `items`, concatenated (rank order); the list itself on one process."""
        if self.state is None:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)


# ---------------------------------------------------------------- Hugging Face transformers


class HFBackend(Backend):
    """Greedy generation with transformers; accepts a path/hub ID or an already-loaded model + tokenizer."""

    name = "hf"

    def __init__(self, model_or_path, tokenizer=None, batch_size: int = 16, max_new_tokens: int = 256,
                 template: str = "auto", system: str | None = None, dtype: str = "auto", device: str | None = None,
                 policy: RefusalPolicy | None = None, show_refusal_tokens: bool = False):
        import torch

        from .models import load_model, load_tokenizer, resolve_template

        if batch_size < 1 or max_new_tokens < 1:
            raise InputError("--batch-size and --max-new-tokens must be at least 1")
        if isinstance(model_or_path, str):
            self.tokenizer = tokenizer or load_tokenizer(model_or_path)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model = load_model(model_or_path, dtype=dtype, device=device)
        else:
            if tokenizer is None:
                raise InputError("HFBackend: a loaded model needs its tokenizer")
            self.model, self.tokenizer = model_or_path, tokenizer
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.eval()
        self.device = next(self.model.parameters()).device
        self.template = resolve_template(self.tokenizer, template)
        self.system, self.batch_size, self.max_new_tokens = system, batch_size, max_new_tokens
        self.show_refusal_tokens = show_refusal_tokens
        # Worked out once, here: a policy that does not fit the model fails before any generation.
        self.policy_parts = policy.for_tokenizer(self.tokenizer) if policy is not None else None
        # The model's own EOS set (Llama-3 chat models also stop at <|eot_id|>), the tokenizer's, and the
        # template's end of turn (ChatML's <|im_end|> where eos is <|endoftext|>).
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids = (self.eos_ids | {end_of_turn_ids(self.tokenizer, self.template)[0]}) - {None}
        self.gen_config = self._greedy_config()

    def _greedy_config(self):
        import copy

        cfg = copy.deepcopy(self.model.generation_config)
        cfg.do_sample, cfg.num_beams, cfg.use_cache = False, 1, True
        # Sampling settings shipped with chat models (temperature 0.6 ...) would only draw warnings.
        cfg.temperature = cfg.top_p = cfg.top_k = None
        cfg.max_new_tokens, cfg.max_length = self.max_new_tokens, None
        cfg.eos_token_id = sorted(self.eos_ids)
        cfg.pad_token_id = self.tokenizer.pad_token_id
        return cfg

    def encode(self, inp: GenInput) -> list[int]:
        return encode_input(self.tokenizer, inp, self.template, self.system)

    def generate_iter(self, inputs: list[GenInput], shard: Shard | None = None) -> Iterator[tuple[list[int], list[str]]]:
        yield from self.generate_ids_iter([self.encode(x) for x in inputs], shard)

    def generate_ids_iter(self, ids: list[list[int]], shard: Shard | None = None) -> Iterator[tuple[list[int], list[str]]]:
        """Batches of similar length, longest first (an out-of-memory batch fails at once, not at the end).

        With a `shard`, only this process's batches: every process forms the same batches, so each
        response is computed exactly as one process would (same batch, same padding).
        """
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            if shard is None or shard.mine(k):
                idx = order[start:start + self.batch_size]
                yield idx, self._generate_batch([ids[i] for i in idx])

    def _generate_batch(self, batch: list[list[int]]) -> list[str]:
        import torch

        from .probe import left_pad

        input_ids, mask, _ = left_pad(batch, self.tokenizer.pad_token_id)
        with torch.inference_mode():
            extra = ({"logits_processor": [refusal_logits_processor(self.policy_parts, input_ids.shape[1])]}
                     if self.policy_parts is not None else {})
            out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=self.gen_config, **extra)
        texts = []
        for row in out[:, input_ids.shape[1]:].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(visible_text(self.tokenizer, row[:end], self.show_refusal_tokens))
        return texts

    def score(self, inputs: list[GenInput], targets: list[str]) -> list[float]:
        """Mean log-probability per token of each target right after its input (teacher forced).

        AutoDAN's fitness: how readily the model starts its answer with e.g. "Sure, here is ...".
        """
        import torch

        from .probe import left_pad

        seqs = [(self.encode(x), encode_text(self.tokenizer, t)) for x, t in zip(inputs, targets)]
        if any(not t for _, t in seqs):
            raise InputError("score: empty target string")
        scores: list[float] = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            ids, mask, pos = left_pad([seqs[i][0] + seqs[i][1] for i in idx], self.tokenizer.pad_token_id)
            keep = max(len(seqs[i][1]) for i in idx) + 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                    position_ids=pos.to(self.device), logits_to_keep=keep).logits[:, -keep:-1]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            # Left padding puts every target at the end: the logits before the last n tokens predict them.
            for row, i in enumerate(idx):
                target = seqs[i][1]
                n = len(target)
                picked = logp[row, keep - 1 - n:, :].gather(-1, torch.tensor(target).unsqueeze(-1))
                scores[i] = float(picked.mean())
        return scores


# ---------------------------------------------------------------- vLLM (optional extra)


class VLLMBackend(Backend):
    """vLLM offline engine, fed the same token ids as HFBackend; greedy. Needs `pip install 'derta[vllm]'`."""

    name = "vllm"

    def __init__(self, model_path: str, batch_size: int = 256, max_new_tokens: int = 256, template: str = "auto",
                 system: str | None = None, dtype: str = "auto", policy: RefusalPolicy | None = None,
                 show_refusal_tokens: bool = False, **engine_kwargs):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise InputError("the vllm backend needs the vllm extra: pip install 'derta[vllm]' (GPU machines)") from None
        from . import models

        extra = {}
        if policy is not None:
            # The same apply_refusal_policy, run per request by vLLM's adapter for request-level processors.
            engine_kwargs["logits_processors"] = [_vllm_refusal_processor_class()]
            extra["extra_args"] = {"derta_refusal_policy": {"thresholds": policy.thresholds, "biases": policy.biases,
                                                            "refusal_phrase": policy.refusal_phrase}}
        self.llm = LLM(model=model_path, dtype=dtype, trust_remote_code=models.TRUST_REMOTE_CODE, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if policy is not None:
            policy.tensors(self.tokenizer)
        self.template = models.resolve_template(self.tokenizer, template)
        self.system, self.batch_size = system, batch_size
        # Refusal tokens are special tokens: vLLM's detokenizer hides them unless asked to show them.
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens,
                                     skip_special_tokens=not show_refusal_tokens, **extra)

    def generate_iter(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        # vLLM schedules its own batches; chunks only bound how much is lost if the run is killed.
        for start in range(0, len(inputs), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(inputs))))
            prompts = [{"prompt_token_ids": encode_input(self.tokenizer, inputs[i], self.template, self.system)} for i in idx]
            outs = self.llm.generate(prompts, self.params, use_tqdm=False)
            yield idx, [o.outputs[0].text for o in outs]


def _vllm_refusal_processor_class():
    """vLLM's request-level adapter around apply_refusal_policy (the policy travels in SamplingParams.extra_args).

    Written against vLLM's V1 `AdapterLogitsProcessor` interface; not run here (vLLM needs a GPU).
    """
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class DertaRefusalProcessor(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False  # it forces and blocks tokens: greedy picks change

        def new_req_logits_processor(self, params):
            spec = (getattr(params, "extra_args", None) or {}).get("derta_refusal_policy")
            if not spec:
                return None
            import torch

            from .models import refusal_tokens

            tokenizer = getattr(self, "derta_tokenizer", None)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = self.derta_tokenizer = AutoTokenizer.from_pretrained(self.vllm_config.model_config.tokenizer)
            policy = RefusalPolicy(spec.get("thresholds", {}), spec.get("biases", {}), spec.get("refusal_phrase", "Sorry"))
            ids, tau, bias, follow = policy.for_tokenizer(tokenizer)
            wanted = set(refusal_tokens(tokenizer).values())

            def one(output_ids: list[int], logits):
                done = torch.tensor([any(t in wanted for t in output_ids)])
                just = torch.tensor([bool(output_ids) and output_ids[-1] in wanted])
                return apply_refusal_policy(logits[None], ids, tau, bias, done, follow, just)[0]

            return one

    return DertaRefusalProcessor


# ---------------------------------------------------------------- OpenAI-compatible HTTP


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
            limit = options.get_max_retries(self.max_retries) if hasattr(options, "get_max_retries") else self.max_retries
            return backoff * 2 ** min(limit - remaining_retries, 10)

    return Client(base_url=base_url, api_key=key, timeout=timeout, max_retries=retries)


class OpenAIClient:
    """An OpenAI-compatible API (chat and completions routes) through the `openai` SDK.

    The base URL comes from the argument or OPENAI_BASE_URL (it includes /v1, as in the openai SDK);
    the key from OPENAI_API_KEY ('EMPTY' when unset, what local servers such as vLLM accept). The
    key is sent in a header and never printed: it is scrubbed from every error message.
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = TIMEOUT,
                 retries: int | None = None, backoff: float | None = None):
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        self._key = api_key if api_key is not None else (os.environ.get("OPENAI_API_KEY") or "EMPTY")
        self.retries = RETRIES if retries is None else retries
        self._client = _sdk_client(self.base_url, self._key, timeout, self.retries, BACKOFF if backoff is None else backoff)

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
            raise InputError(f"cannot reach {url} after {self.retries + 1} attempts: "
                             f"{self._scrub(str(reason) or type(reason).__name__)}") from None
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{url} answered with something other than JSON: {self._scrub(body.decode('utf-8', 'replace'))}") from None

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0, extra: dict | None = None) -> str:
        reply = self.post("chat/completions", {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                               "temperature": temperature, **(extra or {})})
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise InputError(f"{self.base_url}/chat/completions: reply has no choices[0].message.content") from None

    def complete(self, prompt: str, max_tokens: int, temperature: float = 0.0, extra: dict | None = None) -> str:
        reply = self.post("completions", {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                                          "temperature": temperature, **(extra or {})})
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

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, batch_size: int = 16,
                 max_new_tokens: int = 256, system: str | None = None, concurrency: int = 4, extra: dict | None = None,
                 client: OpenAIClient | None = None):
        self.client = client or OpenAIClient(model, base_url, api_key)
        self.batch_size, self.max_new_tokens, self.system = batch_size, max_new_tokens, system
        self.concurrency, self.extra = concurrency, extra

    def _one(self, inp: GenInput) -> str:
        if not inp.chat:
            return self.client.complete(inp.text + inp.prefill, self.max_new_tokens, extra=self.extra)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [{"role": "user", "content": inp.text}]
        if inp.prefill:
            messages.append({"role": "assistant", "content": inp.prefill})
        return self.client.chat(messages, self.max_new_tokens, extra=self.extra)

    def generate_iter(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            for start in range(0, len(inputs), self.batch_size):
                idx = list(range(start, min(start + self.batch_size, len(inputs))))
                yield idx, list(pool.map(self._one, [inputs[i] for i in idx]))


# ---------------------------------------------------------------- choosing a backend


def parse_backend_spec(spec: str) -> tuple[str, str]:
    """'hf:PATH' / 'vllm:PATH' / 'openai:MODEL' -> (kind, model)."""
    kind, sep, model = spec.partition(":")
    if not sep or kind not in BACKENDS or not model:
        raise InputError(f"bad backend spec '{spec}': use hf:PATH, vllm:PATH or openai:MODEL")
    return kind, model


def make_backend(kind: str, model, tokenizer=None, batch_size: int = 16, max_new_tokens: int = 256, template: str = "auto",
                 system: str | None = None, dtype: str = "auto", base_url: str | None = None, extra: dict | None = None,
                 device: str | None = None, tensor_parallel_size: int = 1, policy: RefusalPolicy | None = None,
                 show_refusal_tokens: bool = False) -> Backend:
    """A backend by name; `model` is a path or hub ID (hf, vllm), a loaded model (hf), or a model name (openai).

    `device`: where the hf backend loads the model (default cuda if there is one, else cpu);
    `tensor_parallel_size`: GPUs vLLM splits the model over; `policy`: thresholds / biases on the refusal tokens.
    """
    if kind == "hf":
        return HFBackend(model, tokenizer, batch_size, max_new_tokens, template, system, dtype, device, policy,
                         show_refusal_tokens)
    if kind == "vllm":
        return VLLMBackend(model, max_new_tokens=max_new_tokens, template=template, system=system, dtype=dtype,
                           tensor_parallel_size=tensor_parallel_size, policy=policy,
                           show_refusal_tokens=show_refusal_tokens)
    if policy is not None:
        raise InputError("--calibration sets the model's own next-token probabilities: use --backend hf or vllm")
    if kind == "openai":
        return OpenAIBackend(model, base_url, batch_size=batch_size, max_new_tokens=max_new_tokens, system=system, extra=extra)
    raise InputError(f"unknown backend '{kind}': use one of {', '.join(BACKENDS)}")
