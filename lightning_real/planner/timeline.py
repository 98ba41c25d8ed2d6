"""Timeline picture of a simulated iteration, in the style of the ReaL paper's figure.

Devices are grouped into rows: a row is a maximal run of consecutive devices that take part in
exactly the same calls and moves, so every bar spans whole rows. Each call is one coloured bar
in each row its layout covers; reallocations are hatched grey bars before the call they serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_real.layout import format_ranks
from lightning_real.planner.simulate import Event, SimResult
from lightning_real.plans import Plan

_PALETTE = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974")


def device_rows(events: tuple[Event, ...], n_devices: int) -> list[tuple[int, ...]]:
    """Consecutive devices with the same set of events, as rows (devices in no event are left out)."""
    sig = [frozenset(i for i, e in enumerate(events) if d in e.ranks) for d in range(n_devices)]
    rows: list[tuple[int, ...]] = []
    cur: list[int] = []
    for d in range(n_devices):
        if cur and sig[d] != sig[cur[-1]]:
            rows.append(tuple(cur))
            cur = []
        cur.append(d)
    if cur:
        rows.append(tuple(cur))
    return [r for r in rows if sig[r[0]]]


def plot_timeline(
    sim: SimResult,
    plan: Plan,
    n_devices: int,
    path: str | Path | None = None,
    title: str | None = None,
    device_word: str = "GPU",
) -> Any:
    """Draw the timeline; save it to ``path`` (``.png`` or ``.svg``) when given. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    if not sim.feasible:
        raise ValueError(f"plan {plan.name} does not fit, so it has no timeline: {sim.reason}")
    calls = [e.call for e in sim.events if e.kind == "call"]
    order = sorted(set(calls), key=calls.index)
    color = {c: _PALETTE[i % len(_PALETTE)] for i, c in enumerate(order)}
    rows = device_rows(sim.events, n_devices)
    fig_h = max(2.6, 1.2 + 0.6 * len(rows))
    fig, ax = plt.subplots(figsize=(12, fig_h))
    total = sim.time
    for y, row in enumerate(rows):
        for e in sim.events:
            if row[0] not in e.ranks:
                continue
            width = e.end - e.start
            if e.kind == "realloc":
                ax.barh(
                    y,
                    width,
                    left=e.start,
                    height=0.7,
                    color="#BBBBBB",
                    edgecolor="#555555",
                    hatch="///",
                    lw=0.5,
                )
                continue
            ax.barh(y, width, left=e.start, height=0.7, color=color[e.call], edgecolor="black", lw=0.5)
            if width > 0.035 * total:
                size = 8 if width > 0.08 * total else 6
                ax.text(
                    e.start + width / 2, y, e.call, ha="center", va="center", fontsize=size, color="white"
                )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(
        [f"{device_word}s {format_ranks(r)}" if len(r) > 1 else f"{device_word} {r[0]}" for r in rows]
    )
    ax.invert_yaxis()
    ax.set_xlim(0, total * 1.01)
    ax.set_xlabel("time in the iteration (s)")
    ax.grid(axis="x", ls=":", alpha=0.5)
    handles = [
        Patch(
            color=color[c],
            label=f"{c}: {'vllm:' if plan.backends.get(c) == 'vllm' else ''}{plan.layouts[c]} m={plan.microbatches[c]}",
        )
        for c in order
    ]
    if any(e.kind == "realloc" for e in sim.events):
        handles.append(
            Patch(facecolor="#BBBBBB", edgecolor="#555555", hatch="///", label="parameter reallocation")
        )
    ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    ax.set_title(title or f"{plan.name}: {total:.2f} s per iteration")
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=130, bbox_inches="tight")
    return fig


def log_timeline(fig: Any, key: str = "planner/timeline", run: Any = None) -> None:
    """Log a timeline figure to W&B (the given run, or the active one)."""
    import wandb

    target = run if run is not None else wandb.run
    if target is None:
        raise RuntimeError("log_timeline needs a W&B run: pass run= or call wandb.init() first")
    target.log({key: wandb.Image(fig)})
