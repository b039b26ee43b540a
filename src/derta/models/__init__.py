"""Models: loading checkpoints, formatting prompts, the refusal's tokens, GGUF conversion, the tiny model.

loading.py         load_model / load_tokenizer (safetensors only, trust_remote_code off unless asked)
templates.py       how a question becomes a prompt (chat template, [INST], a format string, raw)
refusal_tokens.py  the refusal transition ("Sorry" / " sorry") and the refusal special tokens
convert.py         `derta convert`: a GGUF file as a safetensors model directory
tiny.py            `derta tiny`: a tiny Llama and its tokenizer, made offline
"""
