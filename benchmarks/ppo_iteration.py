"""PPO iteration time under several plans, side by side in one run, with the per-call breakdown.

Every plan trains the same tiny models on the same data for ``--steps`` iterations on 4 gloo
processes (one Lightning ``Trainer.fit`` each); the first ``--warmup`` iterations are dropped.
Plans run in rounds (A B C D, A B C D, ...) so that drift of a shared machine hits all alike.
Per-call times span from the first rank's start to the last rank's end (``timing_s/<call>``); ``realloc`` is the
time spent moving parameters; the iteration time is the wall time of ``run_iteration``.

Run: ``.venv/bin/python benchmarks/ppo_iteration.py [--steps 8] [--rounds 2] [--batch 32] [--model tiny|small]``
"""

from __future__ import annotations

import argparse
import csv
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning import Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.data.modules import PromptDataModule
from lightning_real.data.task import asset
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.modules.ppo import PPOModule
from lightning_real.strategy import RealStrategy

CALLS = ("actor_gen", "ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train")
PLANS: dict[str, Any] = {
    "symmetric": "symmetric",
    "disjoint": "disjoint",
    "reallocation": {
        "actor_gen": "d4t1p1",
        "ref_inf": "d2t1p1@0-1",
        "rew_inf": "d2t1p1@2-3",
        "critic_inf": "d2t1p1@2-3",
        "actor_train": "d2t2p1",
        "critic_train": "d2t1p1@2-3",
    },
    "search": "search",
}


def _spec(name: str) -> ModelSpec:
    from dataclasses import replace

    spec = tiny_spec("llama")
    if name == "small":  # about 10x the tiny model's compute, still seconds per iteration on CPU
        spec = replace(spec, hidden_size=256, ffn_hidden_size=512, num_heads=8, num_kv_heads=4, num_layers=4)
    return spec


def _module(args: argparse.Namespace) -> PPOModule:
    return PPOModule(
        _spec(args.model),
        batch_size=args.batch,
        generation=GenerationConfig(max_new_tokens=args.gen),
        ppo=PPOConfig(kl_coef=0.01, minibatches=2),
        actor_optim=OptimConfig(lr=1e-3),
        critic_optim=OptimConfig(lr=1e-3),
        prompt_len=24,
    )


def _predicted(plan: Any, args: argparse.Namespace, hw: Any) -> Any:
    """The planner's simulated iteration of ``plan`` on the 4-process cluster (the module's own
    graph, models and the runtime's default features, as RealStrategy resolves them)."""
    from lightning_real.features import RuntimeFeatures
    from lightning_real.planner.auto import cluster_for_world, search_plan
    from lightning_real.planner.simulate import simulate
    from lightning_real.planner.workload import Workload
    from lightning_real.plans import resolve_plan

    module = _module(args)
    graph, specs, features = module.real_graph(), module.real_specs(), RuntimeFeatures()
    resolved = resolve_plan(plan, graph, 4, specs, search=lambda: search_plan(graph, specs, features, 4, 4))
    return simulate(Workload(graph, specs, features), resolved, cluster_for_world(4, 4, hw))


def _run(plan: Any, out: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    trainer = Trainer(
        strategy=RealStrategy(plan=plan, start_method="spawn"),
        accelerator="cpu",
        devices=4,
        max_steps=args.steps,
        logger=CSVLogger(out, name="csv"),
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    module = _module(args)
    trainer.fit(
        module, datamodule=PromptDataModule(asset("prompts"), batch_size=args.batch, max_prompt_len=24)
    )
    with open(next(out.rglob("metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("timing_s/iteration")]
    return [{k: float(v) for k, v in r.items() if v != ""} for r in rows[args.warmup :]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8, help="iterations per run (default 8)")
    ap.add_argument("--warmup", type=int, default=2, help="first iterations dropped (default 2)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per plan, interleaved (default 2)")
    ap.add_argument("--batch", type=int, default=32, help="prompts per iteration (default 32)")
    ap.add_argument("--gen", type=int, default=16, help="new tokens per response (default 16)")
    ap.add_argument("--model", choices=("tiny", "small"), default="tiny", help="model size (default tiny)")
    ap.add_argument("--plans", default=",".join(PLANS), help=f"comma-separated subset of {', '.join(PLANS)}")
    ap.add_argument(
        "--profile", default=None, help="hardware profile JSON for the predictions (default cpu-gloo)"
    )
    args = ap.parse_args()
    names = [n.strip() for n in args.plans.split(",") if n.strip()]
    unknown = [n for n in names if n not in PLANS]
    if unknown:
        raise SystemExit(f"--plans: unknown {unknown}; allowed: {', '.join(PLANS)}")
    rows: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for n in names:
                t = time.time()
                rows[n] += _run(PLANS[n], Path(tmp) / f"{n}-{r}", args)
                print(f"round {r + 1}/{args.rounds} {n}: {time.time() - t:.0f} s", flush=True)

    def med(n: str, key: str) -> float:
        vals = [x[key] for x in rows[n] if key in x]
        return statistics.median(vals) if vals else float("nan")

    base = med("symmetric", "timing_s/iteration") if "symmetric" in rows else float("nan")
    print(
        f"\nmodel={args.model} batch={args.batch} gen={args.gen} steps={args.steps} warmup={args.warmup} "
        f"rounds={args.rounds}; median over {len(next(iter(rows.values())))} iterations per plan, seconds"
    )
    from lightning_real.planner.hardware import CPU_GLOO, load_profile

    hw = load_profile(args.profile) if args.profile else CPU_GLOO
    head = [
        "plan",
        "iteration",
        "predicted",
        "error",
        "vs symmetric",
        *CALLS,
        "realloc",
        "realloc MB",
        "tokens/s/device",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    sims = {n: _predicted(PLANS[n], args, hw) for n in names}
    for n in names:
        it = med(n, "timing_s/iteration")
        pred = sims[n].time
        cells = [n, f"{it:.3f}", f"{pred:.3f}", f"{(pred - it) / it:+.0%}", f"{base / it:.2f}x"]
        cells += [f"{med(n, f'timing_s/{c}'):.3f}" for c in CALLS]
        cells += [f"{med(n, 'timing_s/realloc'):.3f}", f"{med(n, 'realloc/bytes') / 1e6:.2f}"]
        cells += [f"{med(n, 'perf/throughput'):.0f}"]
        print("| " + " | ".join(cells) + " |")
    # Each call's span beside the cost model's time for it, and the iteration's other time
    print("\nper call, measured / predicted (s):\n")
    print("| plan | " + " | ".join(CALLS) + " | calls summed | iteration |")
    print("|" + "---|" * (len(CALLS) + 3))
    for n in names:
        cells = [n]
        measured = predicted = 0.0
        for c in CALLS:
            m, p = med(n, f"timing_s/{c}"), sims[n].costs[c].time
            measured, predicted = measured + m, predicted + p
            cells.append(f"{m:.3f} / {p:.3f}")
        cells += [
            f"{measured:.3f} / {predicted:.3f}",
            f"{med(n, 'timing_s/iteration'):.3f} / {sims[n].time:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
