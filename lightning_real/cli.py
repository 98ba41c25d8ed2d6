"""The ``lightning-real`` command: ``plan`` prices and searches execution plans; ``run`` trains."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_real.planner.hardware import HardwareProfile


def _add_plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="search an execution plan for a recipe on a cluster and compare it with the baselines",
        description=(
            "Search a plan (a layout per model function call) with the MCMC planner, print the plan "
            "table and the predicted iteration time against the symmetric, disjoint and heuristic "
            "baselines, and write the timeline and the plan to --out."
        ),
    )
    p.add_argument(
        "recipe",
        help="recipe YAML (planner or PPO training recipe), or a preset: llama2-7b, ..., ppo-7b, ..., tiny",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the recipe YAML, e.g. actor.path=/models/sft",
    )
    p.add_argument("--nodes", type=int, default=1, help="nodes in the cluster (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="devices per node (default 8)")
    p.add_argument(
        "--gpu",
        default="h100",
        help="device profile: h100, h200, a100, cpu-gloo, or 'local' to calibrate this machine now (default h100)",
    )
    p.add_argument(
        "--profile", default=None, help="JSON hardware profile (as --save-profile writes); overrides --gpu"
    )
    p.add_argument(
        "--save-profile", default=None, help="write the profile used (e.g. a fresh calibration) as JSON"
    )
    p.add_argument("--steps", type=int, default=20000, help="MCMC steps (default 20000)")
    p.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    p.add_argument(
        "--out",
        default="plan-out",
        help="folder for timeline.png/.svg, plan.yaml, report.txt (default plan-out)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="override the recipe's batch size (prompts)")
    p.add_argument("--prompt-len", type=int, default=None, help="override the recipe's prompt length")
    p.add_argument("--gen-len", type=int, default=None, help="override the recipe's generation length")
    p.add_argument(
        "--generation-backend",
        choices=("native", "vllm", "auto"),
        default=None,
        help="override the recipe's engine.generation_backend: native, vllm, or auto (the plan "
        "chooses per generate call)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar (none either when stderr is not a terminal)",
    )
    p.add_argument(
        "--wandb", default=None, metavar="PROJECT", help="also log the timeline and times to this W&B project"
    )
    p.set_defaults(func=_plan)


def _profile(args: argparse.Namespace) -> HardwareProfile:
    from lightning_real.planner.hardware import PROFILES, get_profile, load_profile

    if args.profile:
        return load_profile(args.profile)
    if args.gpu.strip().lower() == "local":
        from lightning_real.planner.calibrate import calibrate

        n = args.gpus_per_node
        print(f"calibrating this machine with {n} processes ...", file=sys.stderr)
        hw, _ = calibrate(n)
        return hw
    try:
        return get_profile(args.gpu)
    except ValueError:
        raise SystemExit(
            f"lightning-real plan: unknown --gpu {args.gpu!r}; allowed: {', '.join(sorted(PROFILES))}, local"
        ) from None


def _plan(args: argparse.Namespace) -> int:
    from pathlib import Path

    import yaml

    from lightning_real.planner.hardware import Cluster, save_profile
    from lightning_real.planner.report import comparison_table, plan_table
    from lightning_real.planner.search import SearchConfig, search
    from lightning_real.planner.simulate import SimResult
    from lightning_real.planner.timeline import plot_timeline
    from lightning_real.recipes.planning import workload_from_recipe

    hw = _profile(args)
    try:
        workload = workload_from_recipe(
            args.recipe,
            args.overrides,
            batch_size=args.batch_size,
            prompt_len=args.prompt_len,
            gen_len=args.gen_len,
        )
        if args.generation_backend is not None:
            from dataclasses import replace

            workload = workload.with_features(
                replace(workload.features, generation_backend=args.generation_backend)
            )
        cluster = Cluster(args.nodes, args.gpus_per_node, hw)
        cfg = SearchConfig(steps=args.steps, seed=args.seed)
    except ValueError as e:
        raise SystemExit(f"lightning-real plan: {e}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.save_profile:
        save_profile(hw, args.save_profile)

    progress: Callable[[int, int, float], None] | None = None
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (CI logs, files), which would get a
        # line per refresh.
        bar = tqdm(total=args.steps, desc="search", unit="step", file=sys.stderr, leave=False, disable=None)

        def progress(step: int, total: int, best: float) -> None:
            bar.n = step
            bar.set_postfix_str(f"best {best:.3f} s", refresh=True)

    try:
        result = search(workload, cluster, cfg, progress)
    except ValueError as e:
        raise SystemExit(f"lightning-real plan: {e}") from None
    finally:
        if bar is not None:
            bar.close()

    w = workload
    head = (
        f"{w.meta.get('recipe', args.recipe)}: actor {_count(w.roles()['actor'].num_params())} params, "
        f"batch {w.calls[0].batch_size}, prompt {w.calls[0].prompt_len}, gen {w.calls[0].gen_len}; "
        f"{args.nodes} x {args.gpus_per_node} {hw.name} ({cluster.n_devices} devices)"
    )
    text = "\n".join(
        [
            head,
            f"priced as run: {w.features.describe()}",
            "",
            plan_table(result.plan, result.sim, hw.usable_mem),
            "",
            comparison_table(result),
            "",
            f"search: {result.steps} steps in {result.seconds:.1f} s, {result.accepted} accepted, "
            f"{result.improved} improvements, seed {args.seed}",
        ]
    )
    print(text)
    fig = plot_timeline(result.sim, result.plan, cluster.n_devices, out / "timeline.png")
    fig.savefig(out / "timeline.svg", bbox_inches="tight")
    doc = {
        "layouts": result.plan.to_strings(),
        "microbatches": dict(result.plan.microbatches),
        **({"recompute": dict(result.plan.recompute)} if result.plan.recompute else {}),
        **({"backends": dict(result.plan.backends)} if result.plan.backends else {}),
        "predicted_iteration_s": round(result.sim.time, 4),
        "cluster": {"nodes": args.nodes, "gpus_per_node": args.gpus_per_node, "gpu": hw.name},
        "features": w.features.to_dict(),
        "baselines_s": {
            k: (round(r.time, 4) if isinstance(r, SimResult) else None)
            for k, (_, r) in result.baselines.items()
        },
    }
    (out / "plan.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    (out / "report.txt").write_text(text + "\n")
    print(
        f"\nwrote {out / 'timeline.png'}, {out / 'timeline.svg'}, {out / 'plan.yaml'}, {out / 'report.txt'}"
    )
    if args.wandb:
        import wandb

        from lightning_real.planner.timeline import log_timeline

        run = wandb.init(project=args.wandb, job_type="plan", config=doc)
        log_timeline(fig, run=run)
        run.log({"planner/iteration_s": result.sim.time})
        run.finish()
    return 0


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _add_run(sub: argparse._SubParsersAction) -> None:
    from lightning_real.recipes.run import add_arguments

    r = sub.add_parser(
        "run",
        help="train a recipe: a YAML file plus KEY=VALUE overrides",
        description=(
            "Train a recipe (sft, rw, ppo, grpo, remax, dpo) from a YAML file with dotted KEY=VALUE "
            "overrides, e.g. 'lightning-real run recipes/ppo.yaml actor.path=... trainer.devices=4'. "
            "Also runs under torchrun -m lightning_real.recipes.run. See docs/recipes.md."
        ),
    )
    add_arguments(r)
    r.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from lightning_real.recipes.run import execute

    # The recipe's own arguments: when they end this process's command line, Lightning may
    # start the other ranks by re-running it.
    return execute(args, [a for a in (args.recipe, *args.overrides) if a is not None])


def _add_plot(sub: argparse._SubParsersAction) -> None:
    from lightning_real.recipes.plot import DEFAULT_KEYS

    p = sub.add_parser("plot", help="draw a run's metrics over steps into a PNG")
    p.add_argument("run", help="run folder (a recipe's output_dir) or a metrics.csv file")
    p.add_argument("--out", default=None, help="PNG to write (default: RUN/metrics.png)")
    p.add_argument(
        "--keys",
        nargs="+",
        default=list(DEFAULT_KEYS),
        help=f"metrics to draw (default: {' '.join(DEFAULT_KEYS)})",
    )
    p.set_defaults(func=_plot_run)


def _plot_run(args: argparse.Namespace) -> int:
    from lightning_real.recipes.plot import PlotError, plot

    out = args.out or str(Path(args.run) / "metrics.png")
    try:
        print(plot(args.run, out, args.keys))
    except PlotError as e:
        print(f"lightning-real plot: error: {e}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands (each subcommand registers itself here)."""
    parser = argparse.ArgumentParser(prog="lightning-real", description="RLHF with parameter reallocation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_plan(sub)
    _add_run(sub)
    _add_plot(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lightning-real`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
