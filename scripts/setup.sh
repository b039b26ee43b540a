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
