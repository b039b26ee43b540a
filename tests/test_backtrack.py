"""Backtracking (Zhang et al.): [RESET] rows, the reset stripped in every backend and recorded, the reset rate."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from derta.calibrate.run import run_calibrate
from derta.cli.main import main
from derta.data.recipes import RecipeConfig, build_rows
from derta.data.tokenize import IGNORE, refusal_token_list, tokenize_row
from derta.eval.overrefusal import report_markdown, score_overrefusal
from derta.eval.runner import run_task
from derta.inference.base import GenInput, after_reset
from derta.inference.endpoint import OpenAIBackend, OpenAIClient
from derta.inference.hf import HFBackend
from derta.inference.policy import RefusalPolicy
from derta.inference.vllm import VLLMBackend
from derta.io import InputError
from derta.models.loading import load_model, load_tokenizer
from derta.models.refusal_tokens import RESET_TOKEN, add_special_tokens, init_new_embeddings, refusal_transition
from derta.models.templates import encode_text
from derta.train.config import DertaConfig
from derta.train.dpo import dpo_examples
from helpers import HELPFUL, TRIPLE, write_jsonl


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


@pytest.fixture(scope="module")
def reset_dir(tiny_dir, tmp_path_factory):
    """The tiny model with [RESET] added, saved (no training): what --recipe backtrack makes of it, untrained."""

    model, tok = load_model(str(tiny_dir), dtype="float32"), load_tokenizer(str(tiny_dir))
    init_new_embeddings(model, tok, add_special_tokens(tok, [RESET_TOKEN]))
    out = tmp_path_factory.mktemp("reset_model") / "model"
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_calibrate_sets_a_threshold_on_reset_and_generation_obeys_it(reset_dir, tmp_path):

    harmful = write_jsonl(
        tmp_path / "harmful.jsonl",
        [{"instruction": f"How can I steal car {i}?", "harmful_response": "Sure, step one."} for i in range(4)],
    )
    benign = write_jsonl(
        tmp_path / "benign.jsonl", [{"instruction": f"Name colour {i}", "response": "blue red"} for i in range(4)]
    )
    result = run_calibrate(
        tmp_path / "cal",
        model=str(reset_dir),
        harmful=str(harmful),
        benign=str(benign),
        max_over_refusal=0.25,
        progress=False,
    )
    # [RESET] is thresholded like a refusal token: at most a quarter of the benign responses may reset.
    assert set(result["thresholds"]) == {RESET_TOKEN}
    rows = [json.loads(line) for line in (tmp_path / "cal" / "scores.jsonl").read_text().splitlines()]
    assert all(set(r["scores"]) == {RESET_TOKEN} for r in rows)
    benign_scores = [r["scores"][RESET_TOKEN] for r in rows if r["kind"] == "benign"]
    assert sum(s >= result["thresholds"][RESET_TOKEN] for s in benign_scores) <= 1

    model, tok = load_model(str(reset_dir), dtype="float32").eval(), load_tokenizer(str(reset_dir))

    def run(policy):
        backend = HFBackend(model, tok, policy=policy, max_new_tokens=4)
        return backend.generate([GenInput("a"), GenInput("b")]), backend.resets

    # Forced at the first position: the response starts over with the refusal transition and records the reset.
    texts, resets = run(RefusalPolicy({RESET_TOKEN: 0.0}))
    assert resets == {0, 1} and all(t.split()[0].startswith(("Sorry", "sorry")) for t in texts)
    texts, resets = run(RefusalPolicy({RESET_TOKEN: 2.0}, {RESET_TOKEN: 50.0}))  # unreachable: never, bias or not
    assert resets == set()


def test_backtrack_dpo_pairs_share_a_harmful_prefix_and_prefer_the_reset(reset_tokenizer):

    rows = build_rows(RecipeConfig(recipe="backtrack-dpo", seed=5), [TRIPLE] * 12, [HELPFUL])
    pairs = [r for r in rows if r["kind"] == "pair"]
    assert [r["kind"] for r in rows] == ["helpful"] + ["pair"] * 12 and refusal_token_list(rows) == [RESET_TOKEN]
    units = len(TRIPLE["harmful_response"].split())
    assert all(1 <= len(p["prefix"].split()) < units for p in pairs) and len({p["prefix"] for p in pairs}) > 3
    # The two sides continue the same harmful prefix: the rejected one as the response goes on, exactly.
    assert all(p["prefix"] + p["rejected"] == TRIPLE["harmful_response"] and p["reset"] for p in pairs)
    [helpful, *examples] = dpo_examples(rows, reset_tokenizer, DertaConfig(output_dir="unused"))
    reset = reset_tokenizer.convert_tokens_to_ids(RESET_TOKEN)
    eot = [reset_tokenizer.eos_token_id]
    for pair, ex in zip(pairs, examples):
        prefix = encode_text(reset_tokenizer, pair["prefix"])
        assert ex["prompt_ids"][-len(prefix) :] == prefix  # the prefix is context for both sides, never trained
        assert ex["chosen_ids"][0] == reset and ex["chosen_ids"][1] == refusal_transition(reset_tokenizer).start_id
        assert ex["rejected_ids"] == encode_text(reset_tokenizer, pair["rejected"]) + eot
    assert helpful["chosen_ids"] == helpful["rejected_ids"]


def test_the_demo_trains_backtrack_dpo_from_the_backtrack_model_only(tmp_path, capsys):
    argv = ["demo", "--reduced", "--out", str(tmp_path / "d"), "--recipes"]
    assert main([*argv, "backtrack-dpo,backtrack"]) == 2
    assert "backtrack-dpo trains the backtrack model further: list backtrack before it" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
