"""Text tables of a plan and of its comparison with the baselines (what ``lightning-real plan`` prints)."""

from __future__ import annotations

from lightning_real.layout import format_ranks
from lightning_real.planner.memory import fmt_bytes
from lightning_real.planner.search import SearchResult
from lightning_real.planner.simulate import SimResult
from lightning_real.plans import Plan


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


def engine_of(plan: Plan, call: str, sim: SimResult) -> str:
    """'native' or 'vllm' for a generate call (the plan's choice, else how it was priced), '-' else."""
    if call in plan.backends:
        return plan.backends[call]
    parts = sim.costs[call].parts
    if "weight_update" in parts:  # priced as a vLLM call (the features fix the backend)
        return "vllm"
    return "native" if "step_overhead" in parts else "-"


def layout_label(plan: Plan, call: str) -> str:
    """The call's layout string, prefixed ``vllm:`` when the plan runs it on the vLLM backend."""
    lay = str(plan.layouts[call])
    return f"vllm:{lay}" if plan.backends.get(call) == "vllm" else lay


def plan_table(plan: Plan, sim: SimResult, usable_bytes: float) -> str:
    """One row per call: devices, degrees, microbatches, generation engine, predicted time and
    span, peak memory."""
    spans = {e.call: (e.start, e.end) for e in sim.events if e.kind == "call"}
    moves = {e.call: e.end - e.start for e in sim.events if e.kind == "realloc"}
    rows = []
    for call, lay in plan.layouts.items():
        start, end = spans[call]
        rows.append(
            [
                call,
                format_ranks(lay.ranks or ()),
                f"{lay.dp}/{lay.tp}/{lay.pp}",
                str(plan.microbatches[call]),
                engine_of(plan, call, sim),
                f"{sim.costs[call].time:.3f}",
                f"{start:.2f}-{end:.2f}",
                f"{moves[call]:.3f}" if call in moves else "-",
                f"{fmt_bytes(sim.peak_mem.get(call, sim.costs[call].memory.total))} / {fmt_bytes(usable_bytes)}",
            ]
        )
    header = ["call", "devices", "dp/tp/pp", "mbs", "engine", "time (s)", "span (s)", "realloc (s)", "memory"]
    return _table(header, rows)


def comparison_table(result: SearchResult) -> str:
    """Predicted iteration time of the searched plan and of each baseline, with the speedup."""
    rows = [["search", f"{result.sim.time:.3f}", "1.00x", f"started from {result.start}"]]
    for name, (plan, res) in result.baselines.items():
        if plan is None or not isinstance(res, SimResult):
            rows.append([name, "-", "-", f"does not fit: {res}"])
            continue
        sp = res.time / result.sim.time
        rows.append(
            [
                name,
                f"{res.time:.3f}",
                f"{sp:.2f}x",
                " ".join(f"{k}={layout_label(plan, k)}" for k in plan.layouts),
            ]
        )
    return _table(["plan", "iteration (s)", "search speedup", "notes"], rows)
