"""Generation backends: HF (batched, left-padded, input order, EOS), the OpenAI-compatible client, vLLM's absence."""

import pytest
import torch

from derta.inference.backends import make_backend, parse_backend_spec
from derta.inference.base import GenInput, encode_input
from derta.inference.endpoint import OpenAIBackend, OpenAIClient
from derta.inference.hf import HFBackend
from derta.inference.vllm import VLLMBackend
from derta.io import InputError
from derta.models.loading import load_model
from derta.models.templates import encode_prompt, encode_text, format_prompt


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return load_model(str(tiny_dir), dtype="float32")


QUESTIONS = [
    "What is the first word?",
    "Tell me a short story about the river and the city, please.",
    "Repeat these words.",
    "Explain the steps.",
]


def test_encode_input_joins_segments_without_retokenizing(tiny_tokenizer):
    tok = tiny_tokenizer
    inp = GenInput("What is the first word?", prefill="Sure, here is")
    prompt_ids = encode_prompt(tok, format_prompt(tok, inp.text, "chat"), "chat")
    assert encode_input(tok, inp, "chat") == prompt_ids + encode_text(tok, "Sure, here is")
    assert tok.decode(prompt_ids).startswith("<s><|user|>\nWhat is the first word?")
    raw = encode_input(tok, GenInput("Here is how:\nStep 1:", chat=False), "chat")
    assert raw[0] == tok.bos_token_id and "<|user|>" not in tok.decode(raw)


def test_hf_batched_left_padded_equals_one_at_a_time_and_keeps_input_order(tiny_model, tiny_tokenizer):
    inputs = [GenInput(q) for q in QUESTIONS] + [
        GenInput("Here is how to do it. Step 1:", chat=False),
        GenInput(QUESTIONS[0], prefill="Sure, here is"),
    ]
    batched = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, max_new_tokens=8).generate(inputs)
    single = HFBackend(tiny_model, tiny_tokenizer, batch_size=1, max_new_tokens=8).generate(inputs)
    assert batched == single
    assert len(batched) == len(inputs) and all(isinstance(t, str) for t in batched)
    # generate_iter hands out batches longest first, with the indices of the inputs they hold.
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=2, max_new_tokens=2)
    batches = list(backend.generate_iter(inputs))
    assert sorted(i for idx, _ in batches for i in idx) == list(range(len(inputs)))
    lengths = [len(backend.encode(inputs[idx[0]])) for idx, _ in batches]
    assert lengths == sorted(lengths, reverse=True)


def test_hf_stops_at_eos_and_drops_what_follows(tiny_model, tiny_tokenizer, monkeypatch):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=2, max_new_tokens=6)
    word = encode_text(tiny_tokenizer, " river")
    eos = tiny_tokenizer.eos_token_id

    def fake_generate(input_ids, attention_mask, generation_config):
        assert generation_config.do_sample is False and generation_config.max_new_tokens == 6
        padded = attention_mask[:, 0] == 0  # left padding: the short input ("Hi") starts with padding
        assert padded.sum() == 1 and attention_mask[:, -1].all()
        tail = torch.tensor([(word + [eos] + word if p else word * 3)[:6] for p in padded])
        return torch.cat([input_ids, tail], dim=1)

    monkeypatch.setattr(backend.model, "generate", fake_generate)
    out = backend.generate([GenInput("Hi"), GenInput("A much longer question than the first one")])
    assert out[0].strip() == "river"
    assert out[1].count("river") >= 2


def test_hf_backend_loads_from_a_path(tiny_dir):
    backend = make_backend("hf", str(tiny_dir), max_new_tokens=3, batch_size=2)
    assert backend.template == "chat"
    assert len(backend.generate([GenInput("What is the last word?")])) == 1


def test_score_matches_an_unpadded_forward_pass(tiny_model, tiny_tokenizer):
    backend = HFBackend(tiny_model, tiny_tokenizer, batch_size=8, max_new_tokens=4)
    inputs = [GenInput(QUESTIONS[0]), GenInput(QUESTIONS[1])]
    targets = ["Sure, here is", "Sure, here is how you can repeat these words"]
    got = backend.score(inputs, targets)
    for inp, target, value in zip(inputs, targets, got):
        prompt, t = backend.encode(inp), encode_text(tiny_tokenizer, target)
        with torch.no_grad():
            logits = tiny_model(torch.tensor([prompt + t])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        expected = sum(logp[len(prompt) - 1 + k, t[k]].item() for k in range(len(t))) / len(t)
        assert value == pytest.approx(expected, abs=1e-4)


def test_openai_backend_retries_a_500_then_succeeds(fake_openai, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-secret")
    fake_openai.fail_next = [500, 429]
    fake_openai.reply = lambda p: "ok:" + (p["messages"][-1]["content"] if "messages" in p else p["prompt"])
    client = OpenAIClient("m", base_url=fake_openai.url, backoff=0.01)
    backend = OpenAIBackend("m", batch_size=2, max_new_tokens=5, client=client)
    out = backend.generate(
        [GenInput("q1"), GenInput("q2", prefill="Sure, here is"), GenInput("continue this", chat=False)]
    )
    assert out[0] == "ok:q1"
    assert out[1] == "ok:Sure, here is"  # the prefill is the last (assistant) message
    assert out[2] == "ok:continue this"  # raw text goes to /completions
    paths = [p for p, _, _ in fake_openai.requests]
    assert paths.count("/v1/chat/completions") == 4 and paths.count("/v1/completions") == 1  # 2 failures + 2 successes
    assert all(auth == "Bearer sk-test-secret" for _, auth, _ in fake_openai.requests)
    prefilled = [p for _, _, p in fake_openai.requests if p.get("messages", [{}])[-1].get("role") == "assistant"]
    assert prefilled and prefilled[0]["max_tokens"] == 5 and prefilled[0]["temperature"] == 0.0


def test_openai_client_errors_are_one_line_and_never_show_the_key(fake_openai, closed_port_url, monkeypatch):
    key = "sk-very-secret-key"
    fake_openai.fail_next = [401]
    fake_openai.reply = lambda payload: key
    client = OpenAIClient("m", base_url=fake_openai.url, api_key=key, backoff=0.01)
    with pytest.raises(InputError, match="HTTP 401") as e:
        client.chat([{"role": "user", "content": "x"}], 4)
    assert key not in str(e.value) and "\n" not in str(e.value)
    assert len(fake_openai.requests) == 1  # a 401 is not retried
    fake_openai.fail_next = [503] * 3
    with pytest.raises(InputError, match="HTTP 503 .*attempt 3"):
        OpenAIClient("m", base_url=fake_openai.url, api_key=key, retries=2, backoff=0.01).chat([], 4)
    with pytest.raises(InputError, match="cannot reach .* after 2 attempts") as e:
        OpenAIClient("m", base_url=closed_port_url, api_key=key, retries=1, backoff=0.01).chat([], 4)
    assert key not in str(e.value) and key not in repr(client)
    # Scrubbed before the message is cut to length: no prefix of the key survives the cut.
    assert key[:6] not in client._scrub("x" * 290 + key)


def test_openai_base_url_from_the_environment(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://example.invalid/v1/")
    assert OpenAIClient("m").base_url == "http://example.invalid/v1"


def test_vllm_backend_says_how_to_install_it():
    try:
        import vllm  # noqa: F401
    except ImportError:
        with pytest.raises(InputError, match=r"derta\[vllm\]"):
            VLLMBackend("some/model")
    else:
        pytest.skip("vllm is installed")


def test_backend_specs():
    assert parse_backend_spec("openai:gpt-4o") == ("openai", "gpt-4o")
    assert parse_backend_spec("hf:/models/x:y") == ("hf", "/models/x:y")
    for bad in ("gpt-4o", "tgi:x", "hf:"):
        with pytest.raises(InputError):
            parse_backend_spec(bad)
    with pytest.raises(InputError, match="unknown backend"):
        make_backend("tgi", "x")


def test_cpu_bf16_generation_is_a_switch_and_a_recorded_setting(tiny_model, tiny_tokenizer):
    from derta.eval.safety import EvalConfig
    from derta.models.precision import generation_precision

    inputs = [GenInput(q) for q in QUESTIONS]
    plain = HFBackend(tiny_model, tiny_tokenizer, batch_size=4, max_new_tokens=6).generate(inputs)
    off = make_backend("hf", tiny_model, tiny_tokenizer, 4, 6, cpu_bf16="off")
    assert off.cpu_bf16 is False and off.generate(inputs) == plain  # off is float32 exactly
    on = make_backend("hf", tiny_model, tiny_tokenizer, 4, 6, cpu_bf16="on")
    texts = on.generate(inputs)
    assert on.cpu_bf16 is True and len(texts) == len(inputs) and all(isinstance(t, str) for t in texts)
    assert next(tiny_model.parameters()).dtype == torch.float32  # autocast, not a cast of the weights
    # A run's manifest gets the key only when bf16 is used, so float32 runs made before the setting still resume.
    assert generation_precision("off") == {} and generation_precision("on", "openai") == {}
    assert generation_precision("on", device=torch.device("cpu")) == {"cpu_bf16": True}
    base = dict(out="o", prompts=["q"], model="m")
    assert "cpu_bf16" not in EvalConfig(**base).manifest(["q"], ["none"], "keyword", None)
    assert EvalConfig(**base, cpu_bf16="on").manifest(["q"], ["none"], "keyword", None)["cpu_bf16"] is True


def test_bf16_generation_keeps_one_cast_of_each_weight(tiny_model, tiny_tokenizer):
    """Autocast keeps a bf16 copy of each weight for a whole generate call only outside inference mode; inside it,
    every weight is cast again at every decoding step."""
    from torch.profiler import ProfilerActivity, profile

    inputs = [GenInput(q) for q in QUESTIONS]
    backend = make_backend("hf", tiny_model, tiny_tokenizer, len(inputs), 8, cpu_bf16="on")
    seen = []
    hook = tiny_model.model.layers[0].register_forward_hook(lambda *a: seen.append(torch.is_inference_mode_enabled()))
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            backend.generate(inputs)
    finally:
        hook.remove()
    assert len(seen) > 2 and not any(seen)  # the prompt's forward and one per new token, none in inference mode
    weights = {tuple(m.weight.shape) for m in tiny_model.modules() if isinstance(m, torch.nn.Linear)}
    linears = sum(isinstance(m, torch.nn.Linear) for m in tiny_model.modules())
    # Weights are the 2-D tensors cast (activations are 3-D): each at most once per generate call.
    weight_casts = sum(
        e.count
        for e in prof.key_averages(group_by_input_shape=True)
        if e.key == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) in weights
    )
    assert 0 < weight_casts <= linears
