"""Simulate one iteration of a workload under a plan: when each call and each move runs.

Rules (see docs/planner.md): a call can start once the calls it depends on have ended and their
outputs have reached it, and once every one of its devices is free (calls on shared devices run
one after another, calls on disjoint devices side by side). Among the calls whose inputs are
ready, the one that can start earliest is placed next (ties: workload order), as a dataflow
runtime would run them; the calls of one model keep their workload order.
Each model has a *home* layout where its parameters live between calls: the layout of its train
call, or of its first call when it is not trained (the runtime's rule,
:meth:`~lightning_real.dataflow.DataflowGraph.home_calls`). A call on another layout first reallocates the
parameters from home; the move occupies the devices of both layouts and may start as soon as
they are free and the parameters are current (after the model's last train call), before the
call's inputs are ready. Each iteration is simulated on its own (nothing overlaps across
iterations). A plan whose memory does not fit on some device is rejected with the reason.
A generate call on the vLLM backend must run ``dNtTp1`` over every device (the runtime's rule;
a plan that breaks it raises), in one microbatch; an engine that is not released keeps its
weights and KV cache on its devices all iteration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_real.dataflow import MFC
from lightning_real.layout import Layout
from lightning_real.planner.cost import CallCost, call_cost
from lightning_real.planner.hardware import Cluster
from lightning_real.planner.memory import fmt_bytes
from lightning_real.planner.space import vllm_unavailable
from lightning_real.planner.transfer import data_move_time, realloc_time
from lightning_real.planner.workload import Workload
from lightning_real.plans import Plan


@dataclass(frozen=True)
class Event:
    """One bar of the timeline."""

    name: str
    """Call name, or ``realloc:<call>`` for the move before a call."""
    kind: str
    """'call' or 'realloc'."""
    call: str
    """The call this event serves."""
    start: float
    """Seconds from the iteration's start."""
    end: float
    """Seconds from the iteration's start."""
    ranks: tuple[int, ...]
    """Devices busy during the event."""


@dataclass(frozen=True)
class SimResult:
    """Outcome of simulating one iteration."""

    time: float
    """Iteration time (end of the last event), seconds; ``inf`` when the plan does not fit."""
    events: tuple[Event, ...]
    """Calls and moves with their times, in start order."""
    costs: dict[str, CallCost]
    """Cost of every call under its layout."""
    peak_mem: dict[str, float]
    """Bytes on the fullest device of each call's layout while it runs (resident states included)."""
    reason: str | None = None
    """Why the plan was rejected (memory), or None."""

    @property
    def feasible(self) -> bool:
        """Whether every call fits."""
        return self.reason is None


def _span(lay: Layout) -> slice:
    ranks = lay.ranks or ()
    lo, hi = min(ranks), max(ranks) + 1
    # Planner layouts are contiguous; others still simulate correctly through an index array.
    return slice(lo, hi) if hi - lo == len(ranks) else np.asarray(ranks)  # type: ignore[return-value]


def _place(
    c: MFC,
    plan: Plan,
    workload: Workload,
    home_call: dict[str, str],
    end: dict[str, float],
    free: np.ndarray,
    params_ready: dict[str, float],
    cluster: Cluster,
) -> tuple[float, tuple[float, float, Any, tuple[int, ...]] | None]:
    """Earliest start of ``c`` given what is scheduled, and the reallocation it needs first."""
    lay = plan.layouts[c.name]
    span = _span(lay)
    ready = 0.0
    for d in c.deps:
        dc = workload.call(d)
        nbytes = dc.batch_size * dc.seq_len * dc.out_bytes_per_token
        ready = max(ready, end[d] + data_move_time(nbytes, plan.layouts[d], lay, cluster))
    home = plan.layouts[home_call[c.role]]
    realloc = None
    busy = float(free[span].max())
    if lay != home:
        rt = realloc_time(workload.spec(c), home, lay, cluster, workload.features_of(c).param_bytes)
        if rt > 0:
            hspan = _span(home)
            rstart = max(params_ready.get(c.role, 0.0), busy, float(free[hspan].max()))
            rend = rstart + rt
            ranks = tuple(sorted(set(lay.ranks or ()) | set(home.ranks or ())))
            realloc = (rstart, rend, hspan, ranks)
            busy = rend
    return max(ready, busy), realloc


def simulate(workload: Workload, plan: Plan, cluster: Cluster, check_memory: bool = True) -> SimResult:
    """Event times of one iteration of ``workload`` under ``plan`` on ``cluster`` (priced with the
    workload's runtime features)."""
    hw = cluster.hw
    n = cluster.n_devices
    for name in workload.names:
        if name not in plan.layouts:
            raise ValueError(f"plan {plan.name} has no layout for call {name!r}")
        lay = plan.layouts[name]
        if max(lay.ranks or (0,)) >= n:
            raise ValueError(f"plan {plan.name}: {name} uses {lay}, beyond the {n} devices of the cluster")
    home_call = workload.homes()
    costs: dict[str, CallCost] = {}
    for c in workload.calls:
        lay = plan.layouts[c.name]
        m = plan.n_mbs(workload.graph, c.name)
        feats = workload.features_of(c, plan.recompute.get(c.name), plan.backends.get(c.name))
        if c.call_type == "generate" and feats.generation_backend == "vllm":
            why = vllm_unavailable(c, workload.spec(c), lay.size, lay.pp, cluster)
            if why is not None:
                raise ValueError(
                    f"plan {plan.name}: {c.name} runs on the vllm backend on {lay}: {why}; "
                    "allowed: a dNtTp1 layout over every device, or the native backend"
                )
            m = 1  # continuous batching: the plan's rounds do not split the rows
        costs[c.name] = call_cost(c, workload.spec(c), lay.dp, lay.tp, lay.pp, m, cluster, feats)

    peak: dict[str, float] = {}
    reason = None
    if check_memory:
        resident = np.zeros(n)
        for cname in home_call.values():
            resident[_span(plan.layouts[cname])] += costs[cname].memory.states
        for c in workload.calls:
            # a vLLM engine that is not released keeps its weights and KV cache all iteration
            resident[_span(plan.layouts[c.name])] += costs[c.name].memory.kept
        for c in workload.calls:
            lay = plan.layouts[c.name]
            mem = costs[c.name].memory
            home = plan.layouts[home_call[c.role]]
            own = mem.transient if lay == home else mem.params + mem.transient
            if c.call_type == "train" and lay != home:
                own = mem.total  # a second train call of a model away from home needs its own states
            need = float(resident[_span(lay)].max()) + own
            peak[c.name] = need
            if need > hw.usable_mem and reason is None:
                reason = (
                    f"{c.name} on {lay} needs {fmt_bytes(need)} per device (its own {mem.describe()}, "
                    f"plus states of models living there) > {fmt_bytes(hw.usable_mem)} usable"
                )
        if reason is not None:
            return SimResult(float("inf"), (), costs, peak, reason)

    free = np.zeros(n)
    end: dict[str, float] = {}
    params_ready: dict[str, float] = {}
    events: list[Event] = []
    order = {c.name: i for i, c in enumerate(workload.calls)}
    # A model's calls keep their workload order (a train call changes what later calls see).
    after_role = {
        c.name: tuple(p.name for p in workload.calls[: order[c.name]] if p.role == c.role)
        for c in workload.calls
    }
    pending = list(workload.calls)
    while pending:
        best = None
        for c in pending:
            if any(d not in end for d in c.deps + after_role[c.name]):
                continue
            plan_c = _place(c, plan, workload, home_call, end, free, params_ready, cluster)
            key = (plan_c[0], order[c.name])
            if best is None or key < best[0]:
                best = (key, c, plan_c)
        assert best is not None, "workload order guarantees a ready call"
        _, c, (start, realloc) = best
        lay = plan.layouts[c.name]
        span = _span(lay)
        if realloc is not None:
            rstart, rend, hspan, ranks = realloc
            free[span] = np.maximum(free[span], rend)
            free[hspan] = np.maximum(free[hspan], rend)
            events.append(Event(f"realloc:{c.name}", "realloc", c.name, rstart, rend, ranks))
        stop = start + costs[c.name].time
        free[span] = stop
        end[c.name] = stop
        if c.call_type == "train":
            params_ready[c.role] = stop
        events.append(Event(c.name, "call", c.name, start, stop, tuple(lay.ranks or ())))
        pending.remove(c)
    events.sort(key=lambda e: (e.start, e.end))
    total = max(e.end for e in events)
    return SimResult(total, tuple(events), costs, peak, None)
