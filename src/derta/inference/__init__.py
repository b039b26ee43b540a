"""Inference: turning inputs into responses, the same way for every evaluation.

base.py       GenInput (a chat turn, optionally prefilled, or raw text) and the Backend interface
hf.py         transformers: batched, left-padded, longest first, greedy
vllm.py       vLLM (the `vllm` extra, GPU machines)
endpoint.py   any OpenAI-compatible endpoint, through the openai SDK
backends.py   choosing one by name
policy.py     refusal-token thresholds applied at every generated position
shard.py      several processes (torchrun / accelerate launch): who does which batch
"""
