#!/usr/bin/env bash
# Fetch, into .whl/ (ignored by git), the wheels the one-GPU machine lacks (Python 3.12, torch
# 2.11, no network there): megatron-core and omegaconf with its parser runtime. Run here, once,
# before scripts/gpu_check.sh travels to the device machine with `carry: [".whl"]`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
PY=${PYTHON:-python3}
for spec in megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.9.3; do
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl "$spec" \
  || $PY -m pip download -q --no-deps --no-binary=:none: -d .whl "$spec"
done
ls -la .whl
