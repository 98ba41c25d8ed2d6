"""Hand-made plans the search starts from and is compared with.

* ``symmetric``: every call on every device with one shared (dp, tp, pp), the fastest such
  layout that fits (the colocated setting of DeepSpeed-Chat-like systems; nothing is reallocated).
* ``disjoint``: actor and reference calls on the first half of the devices, critic and reward
  calls on the second half, each call with its fastest strategy there (the split
  ``RealStrategy(plan="disjoint")`` uses).
* ``mesh-heuristic``: ReaL's meshes with the fastest strategy on each: generation on all devices
  with pipelining, reference inference on all devices, actor training and reward inference on the
  first half, critic training and inference on the second half.
* ``real-heuristic``: ReaL's own rule (its PPO experiments' ``heuristic`` allocation mode), the
  meshes *and* the parallel degrees: generation on all devices as ``pp = max(2, nodes)``, tp 1;
  on one node the actor and critic train on halves as d2t2 (models up to 7B) or d1t4 (up to
  16B), the reference runs on all devices as d2t4, reward and critic inference on halves as d2t2;
  on several nodes the trainings split the nodes by model size (tp 4, dp 2, pp = their nodes),
  the reference takes all nodes (dp 2, tp 4, pp = nodes) and reward and critic inference split
  them in halves. The paper's "x over heuristic" compares with this one.

Within its device mesh each call takes its fastest strategy (``real-heuristic``: its fastest
microbatch count for the given degrees); when the whole plan does not fit, calls step down to
slower options that need less memory until it does (or none is left).
"""

from __future__ import annotations

from collections.abc import Callable

from lightning_real.dataflow import MFC
from lightning_real.planner.hardware import Cluster
from lightning_real.planner.simulate import SimResult, simulate
from lightning_real.planner.space import Mesh, Option, options, strategies
from lightning_real.planner.workload import Workload
from lightning_real.plans import Plan

BASELINES: tuple[str, ...] = ("symmetric", "disjoint", "mesh-heuristic", "real-heuristic")


def halves(cluster: Cluster) -> tuple[Mesh, Mesh] | None:
    """Two valid meshes splitting the cluster in two (None for a single device)."""
    g, n = cluster.gpus_per_node, cluster.n_devices
    if cluster.nodes >= 2:
        k = cluster.nodes // 2
        return Mesh(0, k * g), Mesh(k * g, n - k * g)
    if g >= 2 and g % 2 == 0 and (g // 2) & (g // 2 - 1) == 0:
        return Mesh(0, g // 2), Mesh(g // 2, g // 2)
    return None


def _plan(choice: dict[str, tuple[Mesh, Option]], name: str) -> Plan:
    return Plan(
        {c: o.layout(mesh) for c, (mesh, o) in choice.items()},
        {c: o.m for c, (mesh, o) in choice.items()},
        name,
        {c: o.recompute for c, (mesh, o) in choice.items() if o.recompute != "none"},
        {c: o.backend for c, (mesh, o) in choice.items() if o.backend != "native"},
    )


def _violation(res: SimResult, usable: float) -> float:
    return sum(max(0.0, v - usable) for v in res.peak_mem.values())


def fit_plan(
    workload: Workload,
    cluster: Cluster,
    candidates: dict[str, tuple[Mesh, tuple[Option, ...]]],
    name: str,
    max_rounds: int = 32,
) -> tuple[Plan | None, SimResult | str]:
    """Fastest option per call; while the plan does not fit, change the one call's option that
    most reduces the memory overflow (then the iteration time)."""
    for c, (mesh, opts) in candidates.items():
        if not opts:
            return None, f"{c} fits on no strategy of its {mesh.size} devices"
    usable = cluster.hw.usable_mem
    idx = {c: 0 for c in candidates}

    def run(ix: dict[str, int]) -> tuple[Plan, SimResult]:
        plan = _plan({c: (mesh, opts[ix[c]]) for c, (mesh, opts) in candidates.items()}, name)
        return plan, simulate(workload, plan, cluster)

    plan, res = run(idx)
    for _ in range(max_rounds):
        if res.feasible:
            return plan, res
        best: tuple[float, float, str, int] | None = None
        for c, (_, opts) in candidates.items():
            for j in range(len(opts)):
                if j == idx[c]:
                    continue
                _, r = run({**idx, c: j})
                key = (_violation(r, usable), sum(cc.time for cc in r.costs.values()), c, j)
                if best is None or key < best:
                    best = key
        if best is None or best[0] >= _violation(res, usable):
            break
        idx[best[2]] = best[3]
        plan, res = run(idx)
    if res.feasible:
        return plan, res
    return None, res.reason or "does not fit"


def _options(w: Workload, call: MFC, size: int, cluster: Cluster) -> tuple[Option, ...]:
    return options(call, w.spec(call), size, cluster, w.choices_of(call))


def _on(
    w: Workload, call: MFC, mesh: Mesh, cluster: Cluster, pipelined: bool = False
) -> tuple[Mesh, tuple[Option, ...]]:
    opts = _options(w, call, mesh.size, cluster)
    if pipelined and any(o.pp > 1 for o in opts):
        opts = tuple(o for o in opts if o.pp > 1)
    return mesh, opts


def symmetric(workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """Every call on all devices, one (dp, tp, pp) for all; the fastest that fits."""
    everything = Mesh(0, cluster.n_devices)
    common: set[tuple[int, int, int]] | None = None
    for c in workload.calls:
        s = set(strategies(c, workload.spec(c), everything.size, cluster.gpus_per_node))
        common = s if common is None else common & s
    best: tuple[Plan | None, SimResult | str] | None = None
    tried: list[str] = []
    for dp, tp, pp in sorted(common or ()):
        cand = {}
        for c in workload.calls:
            opts = tuple(
                o
                for o in _options(workload, c, everything.size, cluster)
                if (o.dp, o.tp, o.pp) == (dp, tp, pp)
            )
            cand[c.name] = (everything, opts)
        plan, res = fit_plan(workload, cluster, cand, "symmetric")
        if plan is not None and isinstance(res, SimResult):
            if best is None or (isinstance(best[1], SimResult) and res.time < best[1].time):
                best = (plan, res)
        else:
            tried.append(f"d{dp}t{tp}p{pp}: {res}")
    if best is not None:
        return best
    if not tried:
        return None, "no (dp, tp, pp) over all devices suits every call"
    # The most model-parallel layout is the leanest: its reason says most about the shortfall.
    return None, f"none of {len(tried)} symmetric layouts fits; {tried[-1] if tried else ''}"


def lean(workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """Every call on all devices with its least-memory options first: a start when no baseline fits."""
    everything = Mesh(0, cluster.n_devices)
    cand = {}
    for c in workload.calls:
        opts = _options(workload, c, everything.size, cluster)
        cand[c.name] = (everything, tuple(sorted(opts, key=lambda o: (o.cost.memory.total, o.cost.time))))
    return fit_plan(workload, cluster, cand, "lean")


def disjoint(workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """Actor and reference on the first half, critic and reward on the second."""
    h = halves(cluster)
    if h is None:
        return None, "the cluster cannot be split in two"
    cand = {
        c.name: _on(workload, c, h[1] if c.role in ("critic", "reward") else h[0], cluster)
        for c in workload.calls
    }
    return fit_plan(workload, cluster, cand, "disjoint")


def mesh_heuristic(workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """ReaL's meshes, each call with its fastest strategy there."""
    everything = Mesh(0, cluster.n_devices)
    h = halves(cluster) or (everything, everything)
    cand = {}
    for c in workload.calls:
        if c.call_type == "generate":
            cand[c.name] = _on(workload, c, everything, cluster, pipelined=True)
        elif c.role == "ref":
            cand[c.name] = _on(workload, c, everything, cluster)
        elif c.role == "critic":
            cand[c.name] = _on(workload, c, h[1], cluster)
        else:
            cand[c.name] = _on(workload, c, h[0], cluster)
    return fit_plan(workload, cluster, cand, "mesh-heuristic")


def real_rule(workload: Workload, cluster: Cluster) -> dict[str, tuple[Mesh, tuple[int, int, int]]] | str:
    """ReaL's heuristic allocation of the PPO calls: call -> (mesh, (dp, tp, pp)), or why it does not apply."""
    g, nodes = cluster.gpus_per_node, cluster.nodes
    if g != 8:
        return f"ReaL's heuristic is defined for nodes of 8 devices, not {g}"
    names = set(workload.names)
    need = {"actor_gen", "actor_train", "critic_train", "ref_inf", "rew_inf", "critic_inf"}
    if names != need:
        return f"ReaL's heuristic allocates PPO's six calls; this graph has {sorted(names)}"
    billions = {r: workload.specs[r].num_params() / 1e9 for r in ("actor", "critic")}
    everything = Mesh(0, nodes * g)
    gen_pp = max(2, nodes)
    rule: dict[str, tuple[Mesh, tuple[int, int, int]]] = {
        "actor_gen": (everything, (nodes * g // gen_pp, 1, gen_pp)),
        "ref_inf": (everything, (2, 4, nodes)),
    }
    if nodes == 1:
        for role, mesh in (("actor", Mesh(0, 4)), ("critic", Mesh(4, 4))):
            if billions[role] > 16:
                return f"ReaL's heuristic trains models of up to 16B on one node; the {role} has {billions[role]:.1f}B"
            rule[f"{role}_train"] = (mesh, (2, 2, 1) if billions[role] <= 7 else (1, 4, 1))
        rule["rew_inf"] = (Mesh(0, 4), (2, 2, 1))
        rule["critic_inf"] = (Mesh(4, 4), (2, 2, 1))
        return rule
    a, c = billions["actor"], billions["critic"]
    actor_nodes = min(-(-nodes * a // (a + c)), nodes - 1)
    actor_nodes = int(max(1, actor_nodes))
    rule["actor_train"] = (Mesh(0, actor_nodes * g), (2, 4, actor_nodes))
    rule["critic_train"] = (Mesh(actor_nodes * g, (nodes - actor_nodes) * g), (2, 4, nodes - actor_nodes))
    rew_nodes = -(-nodes // 2)
    rule["rew_inf"] = (Mesh(0, rew_nodes * g), (2, 4, rew_nodes))
    rule["critic_inf"] = (Mesh(rew_nodes * g, (nodes - rew_nodes) * g), (2, 4, nodes - rew_nodes))
    return rule


def real_heuristic(workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """ReaL's own heuristic plan (:func:`real_rule`), its microbatch counts the fastest that fit."""
    rule = real_rule(workload, cluster)
    if isinstance(rule, str):
        return None, rule
    cand = {}
    for c in workload.calls:
        mesh, degrees = rule[c.name]
        opts = tuple(o for o in _options(workload, c, mesh.size, cluster) if (o.dp, o.tp, o.pp) == degrees)
        cand[c.name] = (mesh, opts)
    return fit_plan(workload, cluster, cand, "real-heuristic")


BASELINE_FNS: dict[str, Callable[..., tuple[Plan | None, SimResult | str]]] = {
    "symmetric": symmetric,
    "disjoint": disjoint,
    "mesh-heuristic": mesh_heuristic,
    "real-heuristic": real_heuristic,
}


def baseline(name: str, workload: Workload, cluster: Cluster) -> tuple[Plan | None, SimResult | str]:
    """The named baseline plan and its simulation, or None and why it does not fit."""
    if name not in BASELINE_FNS:
        raise ValueError(f"unknown baseline {name!r}; allowed: {', '.join(BASELINES)}")
    return BASELINE_FNS[name](workload, cluster)
