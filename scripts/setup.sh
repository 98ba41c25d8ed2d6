#!/usr/bin/env bash
# Create .venv and install lightning-real with its test tools. Idempotent.
# torch is installed first and pinned: on a CPU-only machine an unpinned torch pulls the
# multi-GB CUDA build. Set LREAL_TORCH to choose another torch spec (e.g. on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# pip's output without two known notices, everything else (errors included) as it comes; a
# failing pip still stops the script (pipefail):
# * "WARNING: Location ... is ignored", printed when a --target/--prefix setting in the
#   environment points elsewhere;
# * setuptools' "Editable installation." notice, a block from its BuildBackendWarning line to
#   the second "!!" line and the source line after it.
quiet_pip() {
  "$@" 2>&1 | awk '
    /^WARNING: Location / { next }
    /BuildBackendWarning: Editable installation\./ { skip = 1; bangs = 0; next }
    skip == 1 { if ($1 == "!!" && ++bangs == 2) skip = 2; next }
    skip == 2 { skip = 0; next }
    { print }
  '
}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
quiet_pip .venv/bin/python -m pip install -q --upgrade pip
quiet_pip .venv/bin/python -m pip install -q "${LREAL_TORCH:-torch==2.13.0}"
quiet_pip .venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -c "import lightning_real, torch, megatron.core, lightning, transformers; print('lightning-real', lightning_real.__version__, '| torch', torch.__version__)"
