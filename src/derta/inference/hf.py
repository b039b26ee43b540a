"""Generation with transformers: batched, left-padded, longest batches first, KV cache, greedy (or seeded sampling),
stops at the model's end-of-turn set; also teacher-forced scoring of a target string (AutoDAN's fitness)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from derta.inference.base import Backend, GenInput, Sampling, encode_input, left_pad, over_context, padded_forward
from derta.inference.policy import RefusalPolicy, refusal_logits_processor, visible_text
from derta.inference.shard import Shard
from derta.io import NUMERIC_RULES, InputError, check_number
from derta.models.loading import load_model, load_tokenizer
from derta.models.precision import cpu_autocast, resolve_cpu_bf16
from derta.models.templates import check_chat_template, encode_text, end_of_turn_ids, resolve_template


class HFBackend(Backend):
    """Greedy generation with transformers; accepts a path/hub ID or an already-loaded model + tokenizer."""

    name = "hf"

    def __init__(
        self,
        model_or_path,
        tokenizer=None,
        batch_size: int = 16,
        max_new_tokens: int = 256,
        template: str = "auto",
        system: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        policy: RefusalPolicy | None = None,
        show_refusal_tokens: bool = False,
        sampling: Sampling | None = None,
        cpu_bf16: str = "off",
    ):
        import torch

        for flag, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
            check_number(value, "--" + flag.replace("_", "-"), NUMERIC_RULES[flag])
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
        # bf16 autocast for generation on a CPU with bf16 hardware (models.precision); off: float32 as loaded.
        self.cpu_bf16 = resolve_cpu_bf16(cpu_bf16, self.device)
        self.template = resolve_template(self.tokenizer, template)
        if self.template == "chat" and system:
            check_chat_template(self.tokenizer, system)
        self.system, self.batch_size, self.max_new_tokens = system, batch_size, max_new_tokens
        self.over_context: set[int] = set()  # positions of the last generate_iter's inputs beyond the context
        self.show_refusal_tokens = show_refusal_tokens
        # Worked out once, here: a policy that does not fit the model fails before any generation.
        self.policy_parts = policy.for_tokenizer(self.tokenizer) if policy is not None else None
        self.sampling = sampling
        self._check_generation()

    def _check_generation(self) -> None:
        """Work out the stop tokens and generation settings, and generate one token, once, at the start: a
        generation_config.json (or config.json) value of the wrong type is then one line before any work."""
        import torch

        try:
            # The model's own EOS set (Llama-3 chat models also stop at <|eot_id|>), the tokenizer's, and the
            # template's end of turn (ChatML's <|im_end|> where eos is <|endoftext|>).
            eos = self.model.generation_config.eos_token_id
            self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
            self.eos_ids = (self.eos_ids | {end_of_turn_ids(self.tokenizer, self.template)[0]}) - {None}
            self.gen_config = self._generation_config()
            one = copy.deepcopy(self.gen_config)
            one.max_new_tokens, one.do_sample = 1, False
            one.temperature = one.top_p = one.top_k = None
            with torch.inference_mode():
                ids = torch.tensor([self.encode(GenInput("Hi"))], device=self.device)
                self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=one)
        except InputError:
            raise
        except Exception as e:  # any failure on a one-token test input is the model directory's
            detail = " ".join(str(e).split())[:200]
            raise InputError(
                f"the model cannot generate ({type(e).__name__}: {detail}): check its generation_config.json and "
                "config.json",
                getattr(self.model, "name_or_path", None) or None,
            ) from None

    def _generation_config(self):
        """Greedy, or `self.sampling`'s temperature and top-p; the settings a chat model ships with are ignored."""
        cfg = copy.deepcopy(self.model.generation_config)
        cfg.do_sample, cfg.num_beams, cfg.use_cache = self.sampling is not None, 1, True
        cfg.temperature = cfg.top_p = cfg.top_k = None
        if self.sampling is not None:
            cfg.temperature, cfg.top_p, cfg.top_k = self.sampling.temperature, self.sampling.top_p, 0
        cfg.max_new_tokens, cfg.max_length = self.max_new_tokens, None
        cfg.eos_token_id = sorted(self.eos_ids)
        cfg.pad_token_id = self.tokenizer.pad_token_id
        return cfg

    def encode(self, inp: GenInput) -> list[int]:
        return encode_input(self.tokenizer, inp, self.template, self.system)

    def batches(self, inputs: list[GenInput], shard: Shard | None = None) -> Iterator[tuple[list[int], list[str]]]:
        ids = [self.encode(x) for x in inputs]
        lengths = [len(x) + self.max_new_tokens for x in ids]
        self.over_context = over_context(
            self.model, lengths, "prompts (with --max-new-tokens)", shard is None or shard.main
        )
        yield from self.generate_ids_iter(ids, shard)

    def generate_ids_iter(
        self, ids: list[list[int]], shard: Shard | None = None
    ) -> Iterator[tuple[list[int], list[str]]]:
        """Batches of similar length, longest first (an out-of-memory batch fails at once, not at the end).

        With a `shard`, only this process's batches: every process forms the same batches, so each
        response is computed exactly as one process would (same batch, same padding).
        """
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for k, start in enumerate(range(0, len(order), self.batch_size)):
            if shard is None or shard.mine(k):
                idx = order[start : start + self.batch_size]
                yield idx, self._generate_batch([ids[i] for i in idx], k)

    def _generate_batch(self, batch: list[list[int]], batch_number: int = 0) -> list[str]:
        import torch

        input_ids, mask, _ = left_pad(batch, self.tokenizer.pad_token_id)
        # Sampling draws from torch's global generator: seeded per batch, inside a fork that leaves it as it was.
        rng = torch.random.fork_rng(devices=[]) if self.sampling is not None else contextlib.nullcontext()
        # no_grad, not inference_mode: in inference mode autocast keeps no bf16 copy of a weight and casts every
        # weight again at every decoding step (SmolLM2, batch 32: 1.27x slower, the same text).
        with rng, torch.no_grad(), cpu_autocast(self.cpu_bf16):
            if self.sampling is not None:
                torch.manual_seed(self.sampling.seed + batch_number)
            extra = (
                {"logits_processor": [refusal_logits_processor(self.policy_parts, input_ids.shape[1])]}
                if self.policy_parts is not None
                else {}
            )
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                generation_config=self.gen_config,
                **extra,
            )
        texts = []
        for row in out[:, input_ids.shape[1] :].tolist():
            end = next((k for k, t in enumerate(row) if t in self.eos_ids), len(row))
            texts.append(visible_text(self.tokenizer, row[:end], self.show_refusal_tokens))
        return texts

    def score(self, inputs: list[GenInput], targets: list[str]) -> list[float]:
        """Mean log-probability per token of each target right after its input (teacher forced).

        AutoDAN's fitness: how readily the model starts its answer with e.g. "Sure, here is ...".
        """
        import torch

        seqs = [(self.encode(x), encode_text(self.tokenizer, t)) for x, t in zip(inputs, targets)]
        if any(not t for _, t in seqs):
            raise InputError("score: empty target string")
        scores: list[float] = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -sum(map(len, seqs[i])))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            keep = max(len(seqs[i][1]) for i in idx) + 1
            logits = padded_forward(
                self.model, [seqs[i][0] + seqs[i][1] for i in idx], self.tokenizer.pad_token_id, logits_to_keep=keep
            ).logits[:, -keep:-1]
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            # Left padding puts every target at the end: the logits before the last n tokens predict them.
            for row, i in enumerate(idx):
                target = seqs[i][1]
                n = len(target)
                picked = logp[row, keep - 1 - n :, :].gather(-1, torch.tensor(target).unsqueeze(-1))
                scores[i] = float(picked.mean())
        return scores
