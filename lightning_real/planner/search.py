"""MCMC search over plans: Metropolis-Hastings with simulated annealing, started from the best baseline.

A state assigns every call a device mesh and an option (dp, tp, pp, microbatches) priced for that
mesh's size. Each step proposes one change to one call (chosen uniformly):

* ``mesh`` (40%): another mesh on which the call fits; the strategy is kept if it is valid there,
  otherwise one is drawn among the mesh size's options;
* ``option`` (40%): another (dp, tp, pp, m) for the same mesh;
* ``align`` (20%): the mesh and, where valid, the strategy of another call, so that calls can share
  devices and a model can skip a reallocation.

The proposal is simulated; a faster plan is always accepted, a slower one with probability
``exp(-(t_new - t_cur) / (T * t_start))`` where the temperature ``T`` falls geometrically from
``temp_start`` to ``temp_end`` over the steps; plans that do not fit in memory are rejected. A
chain that has not improved the best plan for a tenth of the steps restarts from it. A final
coordinate descent tries, for one call at a time, every option on its mesh and every mesh with
its strategy (or the mesh's fastest one). The best plan seen is returned, so the result is never slower than the starting baseline. The whole
search is a function of the workload, the cluster and the seed: it is deterministic.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from lightning_real.planner.baselines import BASELINES, baseline
from lightning_real.planner.hardware import Cluster
from lightning_real.planner.simulate import SimResult, simulate
from lightning_real.planner.space import Mesh, Option, meshes, no_vllm_option_why, options
from lightning_real.planner.workload import Workload
from lightning_real.plans import Plan


@dataclass(frozen=True)
class SearchConfig:
    """How long and how hot the MCMC search runs."""

    steps: int = 4000
    """Proposals to evaluate."""
    seed: int = 0
    """Seed of the proposal and acceptance draws."""
    temp_start: float = 0.02
    """Initial temperature, as a fraction of the starting plan's time: a plan this much slower is
    accepted with probability 1/e at first."""
    temp_end: float = 0.0005
    """Final temperature (same unit)."""
    polish: bool = True
    """Finish with a coordinate descent (each call's option, then its mesh) from the best plan."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"SearchConfig.steps must be >= 0, got {self.steps}")
        if not 0 < self.temp_end <= self.temp_start:
            raise ValueError(
                f"SearchConfig needs 0 < temp_end <= temp_start, got {self.temp_end} and {self.temp_start}"
            )


@dataclass(frozen=True)
class SearchResult:
    """The best plan found, its simulation, and the baselines it was compared with."""

    plan: Plan
    """Best plan (named 'search')."""
    sim: SimResult
    """Its simulated iteration."""
    baselines: dict[str, tuple[Plan | None, SimResult | str]]
    """Each baseline's plan and simulation, or None and why it does not fit."""
    start: str
    """Name of the baseline the search started from."""
    steps: int
    """Proposals evaluated."""
    accepted: int
    """Proposals accepted."""
    improved: int
    """Times the best plan improved."""
    seconds: float
    """Wall time of the search, baselines included."""
    history: tuple[tuple[int, float], ...] = ()
    """``(step, best time)`` each time the best plan improved."""

    def speedup(self, name: str) -> float | None:
        """Baseline time over the searched plan's time (None when the baseline does not fit)."""
        b = self.baselines[name][1]
        return b.time / self.sim.time if isinstance(b, SimResult) else None


State = dict[str, tuple[Mesh, Option]]


class _Space:
    """Meshes and options per call, computed on first use (the cost model is the slow part)."""

    def __init__(self, workload: Workload, cluster: Cluster) -> None:
        self.workload, self.cluster = workload, cluster
        self.all_meshes = meshes(cluster)
        self.sizes = sorted({m.size for m in self.all_meshes})
        self.by_size = {s: [m for m in self.all_meshes if m.size == s] for s in self.sizes}
        # Sizes on which each call fits at all.
        self.fit_sizes = {
            c.name: [
                s for s in self.sizes if options(c, workload.spec(c), s, cluster, workload.choices_of(c))
            ]
            for c in workload.calls
        }
        for c in workload.calls:
            if not self.fit_sizes[c.name]:
                f = workload.choices_of(c)
                if c.call_type == "generate" and f.generation_backend == "vllm":
                    why = no_vllm_option_why(c, workload.spec(c), cluster, f)
                    raise ValueError(
                        f"{c.name}: generation_backend=vllm needs a dNtTp1 layout over all "
                        f"{cluster.n_devices} devices of the cluster (one engine per replica, no "
                        f"pipeline, the whole world), and none fits: {why}; allowed: "
                        "generation_backend native or auto, a larger vllm.kv_cache_bytes, or more devices"
                    )
                raise ValueError(
                    f"{c.name} fits on no device mesh of this cluster; try more or larger devices"
                )

    def opts(self, call: str, size: int) -> tuple[Option, ...]:
        w = self.workload
        return options(w.call(call), w.spec(call), size, self.cluster, w.choices_of(call))

    def random_mesh(self, call: str, rng: random.Random) -> Mesh:
        size = rng.choice(self.fit_sizes[call])
        return rng.choice(self.by_size[size])

    def neighbour(self, call: str, size: int, o: Option, rng: random.Random) -> Option:
        """An option one step away: one degree or the microbatches doubled or halved."""
        near = [x for x in self.opts(call, size) if _distance(x, o) == 1]
        return rng.choice(near) if near else o

    def same_strategy(self, call: str, size: int, o: Option, rng: random.Random) -> Option:
        opts = self.opts(call, size)
        same = [x for x in opts if _key(x) == _key(o)]
        return same[0] if same else rng.choice(opts)


def _key(o: Option) -> tuple[int, int, int, int, str, str]:
    """What a plan records of an option (its cost follows from it and the mesh size)."""
    return (o.dp, o.tp, o.pp, o.m, o.recompute, o.backend)


def _distance(a: Option, b: Option) -> int:
    """Number of factor-of-two steps between two options' degrees and microbatches."""
    return sum(
        abs(round(math.log2(x / y))) for x, y in ((a.dp, b.dp), (a.tp, b.tp), (a.pp, b.pp), (a.m, b.m))
    ) + (a.backend != b.backend)


def _to_plan(state: State, name: str) -> Plan:
    return Plan(
        {c: o.layout(mesh) for c, (mesh, o) in state.items()},
        {c: o.m for c, (mesh, o) in state.items()},
        name,
        {c: o.recompute for c, (mesh, o) in state.items() if o.recompute != "none"},
        {c: o.backend for c, (mesh, o) in state.items() if o.backend != "native"},
    )


def _from_plan(plan: Plan, space: _Space) -> State:
    state: State = {}
    for c, lay in plan.layouts.items():
        ranks = lay.ranks or ()
        mesh = Mesh(min(ranks), len(ranks))
        o = next(
            x
            for x in space.opts(c, mesh.size)
            if _key(x)
            == (
                lay.dp,
                lay.tp,
                lay.pp,
                plan.microbatches[c],
                plan.recompute.get(c, "none"),
                plan.backends.get(c, "native"),
            )
        )
        state[c] = (mesh, o)
    return state


def _propose(
    space: _Space, cur: State, call: str, names: list[str], rng: random.Random
) -> tuple[Mesh, Option] | None:
    """A changed (mesh, option) for ``call``, or None when the drawn move does not apply."""
    mesh, o = cur[call]
    u = rng.random()
    if u < 0.4:
        new_mesh = space.random_mesh(call, rng)
        return new_mesh, space.same_strategy(call, new_mesh.size, o, rng)
    if u < 0.6:
        return mesh, rng.choice(space.opts(call, mesh.size))
    if u < 0.8:
        return mesh, space.neighbour(call, mesh.size, o, rng)
    other = rng.choice(names)
    omesh, oo = cur[other]
    if other == call or omesh.size not in space.fit_sizes[call]:
        return None
    return omesh, space.same_strategy(call, omesh.size, oo, rng)


def _polish(
    space: _Space, state: State, t: float, workload: Workload, cluster: Cluster
) -> tuple[State, float]:
    """Coordinate descent from ``state``, one call at a time: every option on its mesh, and on
    every other mesh its strategy (where valid) and that mesh's fastest option; until no single
    change helps (annealing leaves such small gains behind)."""
    improved = True
    while improved:
        improved = False
        for call in workload.names:
            mesh, o = state[call]
            moves = [(mesh, x) for x in space.opts(call, mesh.size)]
            for other in space.all_meshes:
                if other == mesh or other.size not in space.fit_sizes[call]:
                    continue
                opts = space.opts(call, other.size)
                same = [y for y in opts if _key(y) == _key(o)]
                moves += [(other, y) for y in [opts[0], *same[:1]]]
            for move in moves:
                if move == state[call]:
                    continue
                prop = {**state, call: move}
                res = simulate(workload, _to_plan(prop, "search"), cluster)
                if res.feasible and res.time < t - 1e-12:
                    state, t, improved = prop, res.time, True
    return state, t


def search(
    workload: Workload,
    cluster: Cluster,
    cfg: SearchConfig = SearchConfig(),
    progress: Callable[[int, int, float], None] | None = None,
) -> SearchResult:
    """Find a fast plan for ``workload`` on ``cluster``.

    ``progress(step, steps, best_time)`` is called every 1% of the steps (for a progress line).
    Raises ValueError, with each baseline's reason, when not even a baseline fits.
    """
    t0 = time.perf_counter()
    space = _Space(workload, cluster)
    bases = {name: baseline(name, workload, cluster) for name in BASELINES}
    fitting = [
        (res.time, name)
        for name, (plan, res) in bases.items()
        if plan is not None and isinstance(res, SimResult)
    ]
    if not fitting:
        why = "; ".join(f"{n}: {r}" for n, (_, r) in bases.items())
        raise ValueError(f"no baseline plan fits, so the search has no start: {why}")
    start_time, start_name = min(fitting)
    start_plan = bases[start_name][0]
    assert start_plan is not None
    cur = _from_plan(start_plan, space)
    cur_t = best_t = start_time
    best = dict(cur)
    rng = random.Random(cfg.seed)
    names = list(workload.names)
    accepted = improved = 0
    history = [(0, best_t)]
    decay = (cfg.temp_end / cfg.temp_start) ** (1 / max(1, cfg.steps - 1))
    temp = cfg.temp_start
    tick = max(1, cfg.steps // 100)
    last_gain, restart_after = 0, max(200, cfg.steps // 10)
    for step in range(1, cfg.steps + 1):
        call = rng.choice(names)
        new = _propose(space, cur, call, names, rng)
        if new is not None and new != cur[call]:
            prop = {**cur, call: new}
            res = simulate(workload, _to_plan(prop, "search"), cluster)
            if res.feasible:
                dt = res.time - cur_t
                if dt <= 0 or rng.random() < math.exp(-dt / (temp * start_time)):
                    cur, cur_t = prop, res.time
                    accepted += 1
                    if cur_t < best_t - 1e-12:
                        best, best_t = dict(cur), cur_t
                        improved += 1
                        last_gain = step
                        history.append((step, best_t))
        temp *= decay
        if step - last_gain >= restart_after:
            # A chain stuck far from the best plan rarely comes back: restart it there.
            cur, cur_t, last_gain = dict(best), best_t, step
        if progress is not None and step % tick == 0:
            progress(step, cfg.steps, best_t)
    if cfg.polish:
        best, best_t = _polish(space, best, best_t, workload, cluster)
        history.append((cfg.steps + 1, best_t))
    plan = _to_plan(best, "search")
    sim = simulate(workload, plan, cluster)
    return SearchResult(
        plan=plan,
        sim=sim,
        baselines=bases,
        start=start_name,
        steps=cfg.steps,
        accepted=accepted,
        improved=improved,
        seconds=time.perf_counter() - t0,
        history=tuple(history),
    )
