#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtualenv in .venv with the CPU build of torch installed
# FIRST (so no dependency can pull a multi-GB CUDA wheel), then llmprune with its dev extras.
# Idempotent: a second run only checks. Usage: bash scripts/bootstrap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${LLMPRUNE_TORCH:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "llmprune ready: $(.venv/bin/python -c 'import llmprune, torch, transformers; print("llmprune", llmprune.__version__, "torch", torch.__version__, "transformers", transformers.__version__)')"
