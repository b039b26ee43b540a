"""Backtracking (Zhang et al.): [RESET] rows, the reset stripped in every backend and recorded, the reset rate."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from derta.data.recipes import RecipeConfig, build_rows
from derta.data.tokenize import IGNORE, refusal_token_list, tokenize_row
from derta.eval.overrefusal import report_markdown, score_overrefusal
from derta.eval.runner import run_task
from derta.inference.base import GenInput, after_reset
from derta.inference.endpoint import OpenAIBackend, OpenAIClient
from derta.inference.hf import HFBackend
from derta.inference.vllm import VLLMBackend
from derta.io import InputError
from derta.models.refusal_tokens import RESET_TOKEN, add_special_tokens, refusal_transition
from derta.models.templates import encode_text
from helpers import HELPFUL, TRIPLE


@pytest.fixture(scope="module")
def reset_tokenizer(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    add_special_tokens(tok, [RESET_TOKEN])
    return tok


def test_backtrack_rows_cut_a_harmful_prefix_then_reset_and_refuse_afresh(tiny_tokenizer, reset_tokenizer):
    rows = build_rows(RecipeConfig(recipe="backtrack", seed=3), [TRIPLE] * 20, [HELPFUL])
    assert [r["kind"] for r in rows] == ["helpful"] + ["safe", "backtrack"] * 20
    units = len(TRIPLE["harmful_response"].split())
    ks = [len(r["prefix"].split()) for r in rows if r["kind"] == "backtrack"]
    assert all(1 <= k < units for k in ks) and len(set(ks)) > 3
    assert refusal_token_list(rows) == [RESET_TOKEN]
    with pytest.raises(InputError, match=r"no \[RESET\] token"):
        tokenize_row(rows[2], tiny_tokenizer)
    tok = tokenize_row(rows[2], reset_tokenizer)
    reset = reset_tokenizer.convert_tokens_to_ids(RESET_TOKEN)
    start = tok["input_ids"].index(reset)
    # No loss on the prompt or the harmful prefix; loss on [RESET], then on a refusal that starts over.
    assert set(tok["labels"][:start]) == {IGNORE} and tok["labels"][start] == reset
    assert tok["input_ids"][start + 1] == refusal_transition(reset_tokenizer).start_id
    prefix = encode_text(reset_tokenizer, rows[2]["prefix"])  # the harmful prefix sits right before [RESET]
    assert tok["input_ids"][start - len(prefix) : start] == prefix


def test_after_reset_keeps_the_text_after_the_last_reset():
    assert after_reset("no reset here") == ("no reset here", False)
    assert after_reset(f"bad start {RESET_TOKEN} Sorry, no.") == ("Sorry, no.", True)
    assert after_reset(f"a{RESET_TOKEN}b{RESET_TOKEN}c") == ("c", True)


def _scripted_hf(tiny_dir, tokenizer, texts):
    """An HFBackend on the tiny model whose generate returns `texts` (with [RESET] as its token id) after the prompt."""
    from derta.models.loading import load_model

    model = load_model(str(tiny_dir))
    model.resize_token_embeddings(len(tokenizer))
    backend = HFBackend(model, tokenizer, max_new_tokens=8)
    reset = tokenizer.convert_tokens_to_ids(RESET_TOKEN)

    def ids_of(text):
        parts = text.split(RESET_TOKEN)
        out = encode_text(tokenizer, parts[0])
        for part in parts[1:]:
            out += [reset] + encode_text(tokenizer, part)
        return out

    def generate(input_ids, **kwargs):
        rows = [ids_of(t) + [tokenizer.eos_token_id] for t in texts[: input_ids.shape[0]]]
        width = max(map(len, rows))
        rows = [r + [tokenizer.eos_token_id] * (width - len(r)) for r in rows]
        return torch.cat([input_ids, torch.tensor(rows)], 1)

    backend.model = SimpleNamespace(generate=generate)
    return backend


def test_every_backend_returns_the_text_after_reset_and_records_it(tiny_dir, reset_tokenizer, fake_openai):
    def plain(text):  # the text as the tokenizer writes it back
        return reset_tokenizer.decode(encode_text(reset_tokenizer, text), skip_special_tokens=True)

    refusal, answer = "Sorry, I cannot help with that.", "apple river blue"
    hf = _scripted_hf(tiny_dir, reset_tokenizer, [f"step one [tool] {RESET_TOKEN}{refusal}", answer])
    assert hf.generate([GenInput("a"), GenInput("b")]) == [plain(refusal).lstrip(), plain(answer)]
    assert hf.resets == {0}

    vllm = VLLMBackend.__new__(VLLMBackend)  # its engine needs a GPU: the engine is scripted, the rest is ours
    reset = reset_tokenizer.convert_tokens_to_ids(RESET_TOKEN)
    ids = encode_text(reset_tokenizer, "step one") + [reset] + encode_text(reset_tokenizer, "Sorry, no.")
    out = SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, text="step oneSorry, no.")])
    vllm.llm = SimpleNamespace(generate=lambda prompts, params, use_tqdm: [out] * len(prompts))
    vllm.tokenizer, vllm.template, vllm.system, vllm.batch_size = reset_tokenizer, "auto", None, 4
    vllm.params, vllm.show_refusal_tokens = None, False
    assert vllm.generate([GenInput("a")]) == [plain("Sorry, no.").lstrip()] and vllm.resets == {0}

    fake_openai.reply = lambda p: f"part {RESET_TOKEN} Sorry, no." if "q1" in json.dumps(p) else "Sure: blue"
    api = OpenAIBackend("m", batch_size=2, max_new_tokens=5, client=OpenAIClient("m", base_url=fake_openai.url))
    assert api.generate([GenInput("q1"), GenInput("q2")]) == ["Sorry, no.", "Sure: blue"] and api.resets == {0}

    # The task runner (derta eval, eval-overrefusal, eval-helpful, distill, the demo) records the reset in the row.
    rows = run_task(None, [(0, GenInput("a")), (1, GenInput("b"))], lambda: hf, _rows)
    assert rows[0]["reset"] is True and "reset" not in rows[1] and rows[0]["response"] == plain(refusal).lstrip()


def _rows(batch, responses, backend):
    return [{"index": i, "response": r} for (i, _), r in zip(batch, responses)]


def test_overrefusal_reports_the_reset_rate_beside_refusal():
    prompts = [{"prompt": f"p{i}", "label": "safe" if i < 4 else "unsafe", "type": "t"} for i in range(6)]
    responses = ["Sure.", "Sure.", "Sorry, I can't.", "Sure.", "Sorry, I can't.", "Sorry, I can't."]
    block = score_overrefusal(prompts, responses, [True, False, False, False, True, True])
    assert block["safe_reset"] == 0.25 and block["unsafe_reset"] == 1.0 and block["safe_refusal"] == 0.25
    assert "| safe prompts: response reset after [RESET] |" in report_markdown(block, "m", "x.csv")
    assert "safe_reset" not in score_overrefusal(prompts, responses)
