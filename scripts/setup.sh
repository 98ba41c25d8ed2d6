#!/usr/bin/env bash
# Create .venv and install lightning-real with its test tools, then .venv-vllm for the vLLM
# backend's tests (scripts/setup_vllm.sh; LREAL_SKIP_VLLM=1 leaves it out). Idempotent.
# torch is installed first and pinned: on a CPU-only machine an unpinned torch pulls the
# multi-GB CUDA build. Set LREAL_TORCH to choose another torch spec (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

source scripts/quiet_pip.sh

[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet_pip .venv/bin/python -m pip install -q --upgrade pip
quiet_pip .venv/bin/python -m pip install -q "${LREAL_TORCH:-torch==2.13.0}"
quiet_pip .venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import lightning_real, torch, megatron.core, lightning, transformers; print('lightning-real', lightning_real.__version__, '| torch', torch.__version__)"
[ "${LREAL_SKIP_VLLM:-0}" = 1 ] || bash scripts/setup_vllm.sh
