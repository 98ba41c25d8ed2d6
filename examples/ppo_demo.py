"""PPO on CPU with parameter reallocation: a tiny model learns the shipped "say the letter" task.

1. writes tiny random LLaMA-family checkpoints in HF format (nothing is downloaded);
2. trains them with PPO on 4 gloo processes, every call on its own layout: the actor trains
   under ``d1t2p2`` and is moved to ``d2t2p1`` to generate, the critic trains under ``d1t2p2``
   and is moved to two ranks to score, the reference and the rule-based reward sit on the
   other ranks; ``--plan symmetric|disjoint|search`` or a YAML file runs another plan;
3. prints the mean reward of the first and the last 10 iterations and writes ``reward_kl.png``
   (reward and KL per step) and a Chrome trace of the last iteration (open it in Perfetto).

``--generation-backend vllm`` generates with vLLM (in ``.venv-vllm``, ``docs/rollout.md``): the
actor is 128 wide (vLLM's CPU attention needs a head size of 32 or more) and generates under
``d4t1p1``, one engine per rank.

Run: ``.venv/bin/python examples/ppo_demo.py [--steps 40] [--plan ...] [--precision bf16-mixed] [--wandb]
[--out runs/ppo_demo] [--generation-backend native|vllm]``
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.data.modules import PromptDataModule
from lightning_real.data.task import asset
from lightning_real.features import RuntimeFeatures
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.hf import save_tiny_hf
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.ppo import PPOModule
from lightning_real.strategy import RealStrategy

PLAN = {
    "actor_gen": "d2t2p1",
    "ref_inf": "d2t1p1@0-1",
    "rew_inf": "d2t1p1@2-3",
    "critic_inf": "d2t1p1@2-3",
    "actor_train": "d1t2p2",
    "critic_train": "d1t2p2",
}
BATCH = 32


def _plot(rows: list[dict[str, str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [float(r["reward/mean"]) for r in rows])
    ax[0].set(title="reward/mean", xlabel="step", ylim=(0, 1))
    ax[1].plot(steps, [float(r["actor/ref_kl"]) for r in rows], color="tab:orange")
    ax[1].set(title="actor/ref_kl (per sequence)", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40, help="PPO iterations (default 40)")
    ap.add_argument(
        "--plan", default=None, help="symmetric, disjoint, search or a YAML plan (default: reallocation)"
    )
    ap.add_argument("--out", default="runs/ppo_demo", help="output folder (default runs/ppo_demo)")
    ap.add_argument(
        "--precision",
        default="32-true",
        choices=("32-true", "bf16-mixed", "bf16-true"),
        help="Lightning precision of every model (default 32-true)",
    )
    ap.add_argument(
        "--wandb", action="store_true", help="log to W&B (offline unless WANDB_MODE says otherwise)"
    )
    ap.add_argument(
        "--generation-backend",
        default="native",
        choices=("native", "vllm"),
        help="engine of the actor's generate call (default native)",
    )
    args = ap.parse_args()
    out = Path(args.out)
    vllm = args.generation_backend == "vllm"
    # vLLM's CPU attention has no kernel for head size 16 (tiny_spec's 64 / 4 heads).
    spec = tiny_spec("llama", hidden_size=128) if vllm else tiny_spec("llama")
    plan = args.plan or ({**PLAN, "actor_gen": "d4t1p1"} if vllm else PLAN)
    actor = out / "init" / "actor"
    # The launcher re-runs this script for ranks 1-3 once the first process is in fit: they find
    # the checkpoint it wrote (the same seed gives the same weights) instead of rewriting it.
    if not (actor / "config.json").is_file():
        save_tiny_hf(spec, actor, seed=0)

    logger = (
        WandbLogger(project="lightning-real-demo", save_dir=str(out), offline=True)
        if args.wandb
        else CSVLogger(out, name="logs")
    )
    start = time.time()
    trainer = Trainer(
        strategy=RealStrategy(
            plan=plan,
            trace_dir=str(out / "traces"),
            features=RuntimeFeatures(precision=args.precision, generation_backend="vllm") if vllm else None,
        ),
        accelerator="auto",
        devices=4,
        precision=args.precision,
        max_steps=args.steps,
        logger=[logger, CSVLogger(out, name="logs")] if args.wandb else logger,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    module = PPOModule(
        actor=str(actor),
        critic=None,  # the actor's trunk with a zero-initialised value head
        reward=None,  # the task's rule (lightning_real.data.task.TaskReward)
        ref=None,  # a frozen copy of the actor
        batch_size=BATCH,
        generation=GenerationConfig(max_new_tokens=8),
        ppo=PPOConfig(kl_coef=0.01, minibatches=2),
        actor_optim=OptimConfig(lr=3e-3),
        critic_optim=OptimConfig(lr=6e-3),
    )
    trainer.fit(module, datamodule=PromptDataModule(asset("prompts"), batch_size=BATCH, max_prompt_len=24))
    if trainer.global_rank != 0:
        return
    with open(max((out / "logs").rglob("metrics.csv"), key=lambda p: p.stat().st_mtime)) as f:
        rows = [r for r in csv.DictReader(f) if r.get("reward/mean")]
    rewards = [float(r["reward/mean"]) for r in rows]
    k = min(10, len(rewards))
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    _plot(rows, out / "reward_kl.png")
    print(f"plan: {trainer.strategy.plan_arg if args.plan else 'reallocation (see PLAN)'}")
    print(f"{len(rewards)} iterations in {time.time() - start:.0f} s")
    print(f"reward/mean: first {k} iterations {first:.3f}, last {k} {last:.3f} (rise {last - first:+.3f})")
    print(f"plot: {out / 'reward_kl.png'}; traces: {out / 'traces'}")


if __name__ == "__main__":
    main()
