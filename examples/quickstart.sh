#!/usr/bin/env bash
# The whole pipeline on CPU in a few minutes: SFT -> reward model -> PPO on the shipped
# "say the letter" task, 4 gloo processes each, from the recipes in recipes/quickstart/.
# Ends with runs/quickstart/reward_kl.png (reward and KL per PPO step) and the offline W&B run
# under runs/quickstart/ppo/wandb (upload it with `wandb sync`).
#   bash examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LR=${LIGHTNING_REAL:-.venv/bin/lightning-real}
export WANDB_MODE=offline WANDB_SILENT=true

start=$(date +%s)
"$LR" run recipes/quickstart/sft.yaml "$@"
"$LR" run recipes/quickstart/rw.yaml "$@"
"$LR" run recipes/quickstart/ppo.yaml "$@"
"$LR" plot runs/quickstart/ppo --out runs/quickstart/reward_kl.png
echo "quickstart done in $(( $(date +%s) - start )) s"
