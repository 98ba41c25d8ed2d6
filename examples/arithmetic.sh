#!/usr/bin/env bash
# Verifiable rewards on CPU in a few minutes: a random tiny llama gets a short SFT warm start on
# generated arithmetic ("What is 3+4?" -> "7"), then GRPO with an exact-match reward raises its
# accuracy on held-out problems, decoded greedily before training and every 10 steps.
# Ends with runs/arithmetic/accuracy.png (val/accuracy and reward/mean over steps).
#   bash examples/arithmetic.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
LR=${LIGHTNING_REAL:-.venv/bin/lightning-real}

start=$(date +%s)
"$PY" -m lightning_real.data.arithmetic --out runs/arithmetic/data --max-operand 9 --eval-rows 40 --sft-rows 115
"$LR" run recipes/arithmetic/sft.yaml
"$LR" run recipes/arithmetic/grpo.yaml
"$LR" plot runs/arithmetic/grpo --keys val/accuracy reward/mean --out runs/arithmetic/accuracy.png
echo "arithmetic done in $(( $(date +%s) - start )) s"
