"""Plans: a layout (and optionally a microbatch count) for every call of a dataflow graph.

A plan is written as a mapping from call name to layout string::

    {"actor_gen": "d4t1p2", "actor_train": "d2t2p1@0-3", "critic_train": "d2t2p1@4-7", ...}

or as a YAML file holding that mapping (at the top level, under ``plan:``, or as ``layouts:``
with an optional ``microbatches:`` mapping, the form ``lightning-real plan`` writes). Named
plans: ``symmetric`` (every call on all devices with one strategy, as DeepSpeed-Chat runs),
``disjoint`` (actor and reference on the first half of the devices, critic and reward on the
second half, as OpenRLHF runs) and ``search`` (the planner's MCMC search, which the caller
supplies: this module sits below the planner).

:class:`Plan` is the one plan type: the planner returns it, plan files hold it, the runtime runs it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_real.dataflow import DataflowGraph
from lightning_real.layout import Layout, LayoutError
from lightning_real.models.spec import ModelSpec, check_layout

PLAN_NAMES: tuple[str, ...] = ("symmetric", "disjoint", "search")
"""Plans :func:`resolve_plan` builds by name."""
PLANNER_REPORT_KEYS: tuple[str, ...] = ("cluster", "predicted_iteration_s", "baselines_s", "features")
"""What ``lightning-real plan`` writes beside the layouts (read, not used, so its plan.yaml runs as is)."""


PlanCause = Literal["layout", "rows", "groups", "minibatches", "microbatches"]
"""What a :class:`PlanError` is about, so callers can name the setting at fault: ``"layout"``
(the plan's layouts), ``"rows"`` (the batch against a layout's dp), ``"groups"`` (response
groups against dp), ``"minibatches"`` (the call's optimizer steps per batch) or
``"microbatches"`` (the call's microbatch count, the graph's ``n_mbs`` unless the plan gives one)."""


class PlanError(ValueError):
    """A plan that does not fit its graph or world: the message names the call and the problem.

    ``call`` is the call at fault (None when the plan as a whole is); ``cause`` what about it
    (:data:`PlanCause`); ``from_plan`` whether the plan itself set the value at fault (a plan's
    own ``microbatches:``) rather than the graph.
    """

    def __init__(
        self, message: str, call: str | None = None, cause: PlanCause = "layout", from_plan: bool = True
    ) -> None:
        super().__init__(message)
        self.call = call
        self.cause = cause
        self.from_plan = from_plan


@dataclass(frozen=True)
class Plan:
    """Where each call runs and, optionally, how many microbatches it takes."""

    layouts: Mapping[str, Layout]
    """Call name -> layout; ranks may be left out when a layout spans the whole world."""
    microbatches: Mapping[str, int] = field(default_factory=dict)
    """Call name -> microbatches per data-parallel replica; calls left out keep the graph's ``n_mbs``."""
    name: str = field(default="plan", compare=False)
    """Label for logs and reports ('symmetric', 'search', a file name, ...)."""
    recompute: Mapping[str, str] = field(default_factory=dict)
    """Train call name -> activation recomputation ('none', 'selective', 'full'), used when the
    runtime features leave it to the plan (``recompute: auto``); calls left out: none."""
    backends: Mapping[str, str] = field(default_factory=dict)
    """Generate call name -> generation engine ('native', 'vllm'), used when the runtime features
    leave it to the plan (``generation_backend: auto``); calls left out: native."""

    def __post_init__(self) -> None:
        if not isinstance(self.layouts, Mapping) or not self.layouts:
            raise PlanError(f"plan {self.name}: layouts must be a non-empty mapping of call name to layout")
        lays: dict[str, Layout] = {}
        for call, lay in self.layouts.items():
            if not isinstance(lay, Layout | str):
                raise PlanError(
                    f"plan {self.name}: layout of {call} is {lay!r}; allowed: a Layout or a string like 'd2t2p1@0-3'"
                )
            try:
                lays[str(call)] = Layout.parse(lay) if isinstance(lay, str) else lay
            except LayoutError as e:
                raise PlanError(f"plan {self.name}: layout of {call}: {e}") from None
        mbs: dict[str, int] = {}
        for call, m in dict(self.microbatches or {}).items():
            if call not in lays:
                raise PlanError(f"plan {self.name}: microbatches name {call!r}, which has no layout")
            if not isinstance(m, int) or isinstance(m, bool) or m < 1:
                raise PlanError(f"plan {self.name}: microbatches of {call} = {m!r}; allowed: an integer >= 1")
            mbs[str(call)] = m
        rc: dict[str, str] = {}
        for call, v in dict(self.recompute or {}).items():
            if call not in lays:
                raise PlanError(f"plan {self.name}: recompute names {call!r}, which has no layout")
            if v not in ("none", "selective", "full"):
                raise PlanError(
                    f"plan {self.name}: recompute of {call} = {v!r}; allowed: none, selective, full"
                )
            rc[str(call)] = str(v)
        be: dict[str, str] = {}
        for call, v in dict(self.backends or {}).items():
            if call not in lays:
                raise PlanError(f"plan {self.name}: backends names {call!r}, which has no layout")
            if v not in ("native", "vllm"):
                raise PlanError(f"plan {self.name}: backend of {call} = {v!r}; allowed: native, vllm")
            be[str(call)] = str(v)
        object.__setattr__(self, "layouts", lays)
        object.__setattr__(self, "microbatches", mbs)
        object.__setattr__(self, "recompute", rc)
        object.__setattr__(self, "backends", be)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], name: str = "plan") -> Plan:
        """Read ``{call: layout}``, or ``{"layouts": {...}, "microbatches": {...}}``."""
        if not isinstance(data, Mapping):
            raise PlanError(
                f"plan {name}: expected a mapping of call name to layout, got {type(data).__name__}"
            )
        if "plan" in data and isinstance(data["plan"], Mapping):
            data = data["plan"]
        if "layouts" in data:
            sections = {"layouts", "microbatches", "recompute", "backends"}
            extra = sorted(set(data) - {*sections, "name", *PLANNER_REPORT_KEYS})
            if extra:
                raise PlanError(
                    f"plan {name}: unknown sections {extra}; allowed: layouts, microbatches, recompute, backends"
                )
            return cls(
                dict(data["layouts"]),
                dict(data.get("microbatches") or {}),
                str(data.get("name", name)),
                dict(data.get("recompute") or {}),
                dict(data.get("backends") or {}),
            )
        return cls(dict(data), {}, name)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Plan:
        """Read a YAML plan file (any form :meth:`from_dict` reads)."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise PlanError(f"plan file {str(p)!r} does not exist")
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise PlanError(f"plan file {p}: not valid YAML: {e}") from None
        return cls.from_dict(data or {}, name=p.stem)

    def to_dict(self) -> dict[str, Any]:
        """The form :meth:`from_dict` reads back (layout strings)."""
        out: dict[str, Any] = {"layouts": {k: str(v) for k, v in self.layouts.items()}}
        if self.microbatches:
            out["microbatches"] = dict(self.microbatches)
        if self.recompute:
            out["recompute"] = dict(self.recompute)
        if self.backends:
            out["backends"] = dict(self.backends)
        return out

    def to_yaml(self, path: str | Path) -> None:
        """Write :meth:`to_dict` as YAML."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def n_mbs(self, graph: DataflowGraph, call: str) -> int:
        """Microbatches of ``call``: the plan's count, else the graph's."""
        return self.microbatches.get(call, graph.call(call).n_mbs)

    def to_strings(self) -> dict[str, str]:
        """Call name -> layout string (``d4t1p2@0-7``), as plan files and checkpoints spell it."""
        return {k: str(v) for k, v in self.layouts.items()}

    def with_name(self, name: str) -> Plan:
        """The same plan under another label."""
        return Plan(
            dict(self.layouts), dict(self.microbatches), name, dict(self.recompute), dict(self.backends)
        )

    def __str__(self) -> str:
        return f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.layouts.items())


def symmetric(graph: DataflowGraph, world_size: int, tp: int = 1, pp: int = 1) -> Plan:
    """Every call on every rank with the same ``dp x tp x pp`` (dp = world / (tp * pp)).

    Nothing moves between calls: the colocated set-up of DeepSpeed-Chat.
    """
    if world_size < 1 or world_size % (tp * pp):
        raise PlanError(f"symmetric plan: world size {world_size} is not divisible by tp*pp = {tp}*{pp}")
    lay = Layout(world_size // (tp * pp), tp, pp, tuple(range(world_size)))
    return Plan({c.name: lay for c in graph.calls}, {}, "symmetric")


def disjoint(graph: DataflowGraph, world_size: int, tp: int = 1, pp: int = 1) -> Plan:
    """Actor and reference calls on the first half of the ranks, critic and reward calls on the
    second half, each half with ``dp = half / (tp * pp)``: the split OpenRLHF uses."""
    if world_size < 2 or world_size % 2:
        raise PlanError(f"disjoint plan: needs an even world size >= 2, got {world_size}")
    half = world_size // 2
    if half % (tp * pp):
        raise PlanError(f"disjoint plan: half the world ({half} ranks) is not divisible by tp*pp = {tp}*{pp}")
    dp = half // (tp * pp)
    first = Layout(dp, tp, pp, tuple(range(half)))
    second = Layout(dp, tp, pp, tuple(range(half, world_size)))
    return Plan(
        {c.name: second if c.role in ("critic", "reward") else first for c in graph.calls}, {}, "disjoint"
    )


def resolve_plan(
    plan: str | Path | Mapping[str, Any] | Plan,
    graph: DataflowGraph,
    world_size: int,
    specs: Mapping[str, ModelSpec] | None = None,
    search: Callable[[], Plan] | None = None,
) -> Plan:
    """A checked plan for ``graph`` on ``world_size`` ranks, every layout with explicit ranks.

    ``plan`` is a name (``symmetric``, ``disjoint``, ``search``), a YAML file, a mapping or a
    :class:`Plan`. ``specs`` gives each role's model (checked against its layouts' tp and pp).
    ``search`` runs the planner for ``plan="search"`` (see
    :func:`lightning_real.planner.auto.search_plan`). Every call gets its microbatch count (the
    plan's or the graph's).
    """
    if isinstance(plan, Plan):
        p = plan
    elif isinstance(plan, Mapping):
        p = Plan.from_dict(plan)
    elif isinstance(plan, Path) or (
        isinstance(plan, str) and plan.strip().lower().endswith((".yaml", ".yml"))
    ):
        p = Plan.from_yaml(plan)
    elif isinstance(plan, str):
        key = plan.strip().lower()
        if key == "symmetric":
            p = symmetric(graph, world_size)
        elif key == "disjoint":
            p = disjoint(graph, world_size)
        elif key == "search":
            if search is None:
                raise PlanError(
                    "plan='search' needs the planner (pass search=...; RealStrategy does); "
                    f"or use one of: {', '.join(n for n in PLAN_NAMES if n != 'search')}, a mapping or a YAML file"
                )
            p = search()
        elif Path(plan).is_file():
            p = Plan.from_yaml(plan)
        else:
            raise PlanError(
                f"unknown plan {plan!r}; allowed: {', '.join(repr(n) for n in PLAN_NAMES)}, "
                "a YAML file path, or a mapping from call name to layout"
            )
    else:
        raise PlanError(
            f"plan={plan!r}; allowed: {', '.join(repr(n) for n in PLAN_NAMES)}, a YAML file path, "
            "a mapping from call name to layout, or a Plan"
        )
    return check_plan(p, graph, world_size, specs)


def check_plan(
    plan: Plan, graph: DataflowGraph, world_size: int, specs: Mapping[str, ModelSpec] | None = None
) -> Plan:
    """``plan`` with resolved layouts and every call's microbatches, or a PlanError naming the call."""
    missing = [n for n in graph.names if n not in plan.layouts]
    if missing:
        raise PlanError(
            f"plan {plan.name}: no layout for calls {missing}; the graph's calls: {', '.join(graph.names)}"
        )
    unknown = [n for n in plan.layouts if n not in graph]
    if unknown:
        raise PlanError(
            f"plan {plan.name}: names calls {unknown} that the graph does not have; calls: {', '.join(graph.names)}"
        )
    if specs is not None:
        lacking = [r for r in graph.roles() if r not in specs]
        if lacking:
            raise PlanError(f"plan {plan.name}: no model spec for roles {lacking}; given: {', '.join(specs)}")
    layouts: dict[str, Layout] = {}
    mbs: dict[str, int] = {}
    for c in graph.calls:
        lay = plan.layouts[c.name]
        try:
            resolved = lay.resolve(world_size)
            if specs is not None:
                check_layout(specs[c.role], lay)
            lay = resolved
        except LayoutError as e:
            raise PlanError(f"plan {plan.name}: call {c.name}: {e}", c.name) from None
        if c.input_rows % lay.dp or c.batch_size % lay.dp:
            raise PlanError(
                f"plan {plan.name}: call {c.name} ({lay}): its {c.input_rows} input rows and {c.batch_size} "
                f"sequences must both be divisible by dp={lay.dp}",
                c.name,
                "rows",
            )
        per_replica = c.batch_size // lay.dp
        if per_replica % c.group_size:
            raise PlanError(
                f"plan {plan.name}: call {c.name} ({lay}): {per_replica} sequences per replica split "
                f"groups of {c.group_size}",
                c.name,
                "groups",
            )
        if per_replica % c.minibatches:
            raise PlanError(
                f"plan {plan.name}: call {c.name} ({lay}): {per_replica} sequences per replica do not split "
                f"into {c.minibatches} minibatches",
                c.name,
                "minibatches",
                from_plan=False,
            )
        m = plan.n_mbs(graph, c.name)
        step_rows = per_replica // c.minibatches
        if m > step_rows:
            raise PlanError(
                f"plan {plan.name}: call {c.name} ({lay}): {m} microbatches exceed the {step_rows} sequences "
                "per replica and optimizer step",
                c.name,
                "microbatches",
                from_plan=c.name in plan.microbatches,
            )
        layouts[c.name] = lay
        mbs[c.name] = m
    for call in plan.recompute:
        if graph.call(call).call_type != "train":
            raise PlanError(f"plan {plan.name}: recompute names {call}, which is not a train call")
    for call in plan.backends:
        if graph.call(call).call_type != "generate":
            raise PlanError(f"plan {plan.name}: backends names {call}, which is not a generate call")
    return Plan(layouts, mbs, plan.name, dict(plan.recompute), dict(plan.backends))
