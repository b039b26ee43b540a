"""vLLM's offline engine as a backend (the `vllm` extra, GPU machines), fed the same token ids as the hf backend."""

from __future__ import annotations

from collections.abc import Iterator

from derta.inference.base import Backend, GenInput, encode_input
from derta.inference.policy import RefusalPolicy, apply_refusal_policy, visible_text
from derta.io import InputError
from derta.models import loading
from derta.models.refusal_tokens import REFUSAL_PHRASE, reset_token_id
from derta.models.templates import resolve_template


class VLLMBackend(Backend):
    """vLLM offline engine, fed the same token ids as HFBackend; greedy. Needs `pip install 'derta[vllm]'`."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        batch_size: int = 256,
        max_new_tokens: int = 256,
        template: str = "auto",
        system: str | None = None,
        dtype: str = "auto",
        policy: RefusalPolicy | None = None,
        show_refusal_tokens: bool = False,
        **engine_kwargs,
    ):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise InputError(
                "the vllm backend needs the vllm extra: pip install 'derta[vllm]' (GPU machines)"
            ) from None

        extra = {}
        if policy is not None:
            # The same apply_refusal_policy, run per request by vLLM's adapter for request-level processors.
            engine_kwargs["logits_processors"] = [_vllm_refusal_processor_class()]
            extra["extra_args"] = {
                "derta_refusal_policy": {
                    "thresholds": policy.thresholds,
                    "biases": policy.biases,
                    "refusal_phrase": policy.refusal_phrase,
                }
            }
        self.llm = LLM(model=model_path, dtype=dtype, trust_remote_code=loading.TRUST_REMOTE_CODE, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        if policy is not None:
            policy.tensors(self.tokenizer)
        self.template = resolve_template(self.tokenizer, template)
        self.system, self.batch_size, self.show_refusal_tokens = system, batch_size, show_refusal_tokens
        # Refusal tokens are special tokens: vLLM's detokenizer hides them unless asked to show them.
        self.params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, skip_special_tokens=not show_refusal_tokens, **extra
        )

    def batches(self, inputs: list[GenInput]) -> Iterator[tuple[list[int], list[str]]]:
        # A backtracking model's [RESET] is a special token vLLM's text hides: its responses are decoded from the
        # token ids as the hf backend decodes them (visible_text keeps [RESET] for Backend.generate_iter).
        reset = reset_token_id(self.tokenizer) is not None
        # vLLM schedules its own batches; chunks only bound how much is lost if the run is killed.
        for start in range(0, len(inputs), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(inputs))))
            prompts = [
                {"prompt_token_ids": encode_input(self.tokenizer, inputs[i], self.template, self.system)} for i in idx
            ]
            outs = self.llm.generate(prompts, self.params, use_tqdm=False)
            yield (
                idx,
                [
                    visible_text(self.tokenizer, list(o.outputs[0].token_ids), self.show_refusal_tokens)
                    if reset
                    else o.outputs[0].text
                    for o in outs
                ],
            )


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

            tokenizer = getattr(self, "derta_tokenizer", None)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = self.derta_tokenizer = AutoTokenizer.from_pretrained(
                    self.vllm_config.model_config.tokenizer
                )
            policy = RefusalPolicy(
                spec.get("thresholds", {}), spec.get("biases", {}), spec.get("refusal_phrase", REFUSAL_PHRASE)
            )
            ids, tau, bias, follow = policy.for_tokenizer(tokenizer)
            wanted = set(ids.tolist())

            def one(output_ids: list[int], logits):
                done = torch.tensor([any(t in wanted for t in output_ids)])
                just = torch.tensor([bool(output_ids) and output_ids[-1] in wanted])
                return apply_refusal_policy(logits[None], ids, tau, bias, done, follow, just)[0]

            return one

    return DertaRefusalProcessor
