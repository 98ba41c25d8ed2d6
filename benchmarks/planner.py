"""Planner benchmark: search time and predicted speedup over the baselines, in the ReaL paper's settings.

LLaMA-2 actor, critic, reference and reward of one size (7B on 8 H100s, 13B on 16, 34B on 32,
70B on 64 and 128), PPO with 512 prompts of 128 tokens, generating 128, 384 or 896 tokens. For
each setting the MCMC search runs ``--steps`` steps; the table gives its wall time, the predicted
iteration time of the searched plan and its speedup over each baseline (predictions of the cost
model, not measurements).

    python benchmarks/planner.py                 # all 15 settings, markdown table
    python benchmarks/planner.py --quick         # 7B and 70B/128 with 384 tokens only
    python benchmarks/planner.py --out bench-out # also timelines and a JSON of the results
    python benchmarks/planner.py --quick --generation-backend auto  # generation may choose vLLM

``--generation-backend auto`` lets each generate call choose the native generator or vLLM
(docs/planner.md, "vLLM generation"; the default vLLM configuration: a 1 GiB KV cache per
engine, eager); the per-call table writes a vLLM call's layout as ``vllm:d4t2p1@0-7``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from lightning_real.planner.hardware import Cluster, get_profile
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.search import SearchConfig, search
from lightning_real.planner.simulate import SimResult
from lightning_real.planner.timeline import plot_timeline
from lightning_real.planner.workload import GPU_FEATURES, ppo_workload

SETTINGS: list[tuple[str, int]] = [("7b", 8), ("13b", 16), ("34b", 32), ("70b", 64), ("70b", 128)]
GEN_LENS: tuple[int, ...] = (128, 384, 896)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20000, help="MCMC steps per search (default 20000)")
    ap.add_argument("--seed", type=int, default=0, help="search seed (default 0)")
    ap.add_argument("--gpu", default="h100", help="device profile (default h100)")
    ap.add_argument("--quick", action="store_true", help="only 7B/8 and 70B/128 with 384 generated tokens")
    ap.add_argument("--out", type=Path, default=None, help="folder for timelines and results.json")
    ap.add_argument(
        "--generation-backend",
        choices=("native", "vllm", "auto"),
        default="native",
        help="engine of the generate call (default native; auto: the search chooses)",
    )
    args = ap.parse_args(argv)

    hw = get_profile(args.gpu)
    runs = [(s, n, g) for s, n in SETTINGS for g in GEN_LENS]
    if args.quick:
        runs = [("7b", 8, 384), ("70b", 128, 384)]
    rows = []
    print(
        "| model | GPUs | gen | search (s) | search plan (s) | ReaL heuristic (s) | vs symmetric | vs disjoint "
        "| vs mesh-heuristic | vs real-heuristic | start |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_call: list[str] = []
    for size, n, gen in runs:
        features = replace(GPU_FEATURES, generation_backend=args.generation_backend)
        w = ppo_workload(
            llama2_spec(size),
            batch_size=512,
            prompt_len=128,
            gen_len=gen,
            ppo_minibatches=4,
            features=features,
        )
        cluster = Cluster(max(1, n // 8), min(8, n), hw)
        r = search(w, cluster, SearchConfig(steps=args.steps, seed=args.seed))
        sp = {k: r.speedup(k) for k in r.baselines}
        cells = [f"{v:.2f}x" if v is not None else "does not fit" for v in sp.values()]
        real = r.baselines["real-heuristic"][1]
        real_s = f"{real.time:.2f}" if isinstance(real, SimResult) else "does not fit"
        print(
            f"| 4x{size} | {n} | {gen} | {r.seconds:.1f} | {r.sim.time:.2f} | {real_s} | "
            + " | ".join(cells)
            + f" | {r.start} |"
        )
        per_call.append(
            f"| 4x{size} | {n} | {gen} | "
            + " | ".join(
                f"{c}: {'vllm:' if r.plan.backends.get(c) == 'vllm' else ''}{r.plan.layouts[c]} "
                f"m{r.plan.microbatches[c]} {r.sim.costs[c].time:.2f}"
                for c in w.names
            )
            + " |"
        )
        sys.stdout.flush()
        rows.append(
            dict(
                model=size,
                gpus=n,
                gen_len=gen,
                search_s=r.seconds,
                iteration_s=r.sim.time,
                speedup=sp,
                plan=r.plan.to_strings(),
                microbatches=r.plan.microbatches,
                backends=dict(r.plan.backends),
                start=r.start,
            )
        )
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            plot_timeline(r.sim, r.plan, cluster.n_devices, args.out / f"timeline-{size}-{n}-{gen}.png")
    print("\nSearched plans, per call: layout, microbatches (rounds for generation), predicted seconds")
    print("| model | GPUs | gen | " + " | ".join(w.names) + " |")
    print("|---|---|---|" + "---|" * len(w.names))
    print("\n".join(per_call))
    if args.out is not None:
        (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
