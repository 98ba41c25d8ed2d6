#!/usr/bin/env bash
# Create .venv and install lightning-real with its test tools. Idempotent.
# torch is installed first and pinned: on a CPU-only machine an unpinned torch pulls the
# multi-GB CUDA build. Set LREAL_TORCH to choose another torch spec (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q "${LREAL_TORCH:-torch==2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import lightning_real, torch, megatron.core, lightning, transformers; print('lightning-real', lightning_real.__version__, '| torch', torch.__version__)"
