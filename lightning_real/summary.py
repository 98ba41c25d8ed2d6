"""What a run runs, printed once on rank 0: each role's parameters and calls, and the planner's
predicted iteration time against the measured one.

Lightning's model summary sees only the LightningModule's own parameters; the models of an RLHF
module are megatron-core shards the runtime owns, so it would count one parameter. This summary
reads the strategy (plan, microbatches, world, features) and the built runtime instead::

    PPOModule on 4 processes (gloo, 4 per node), plan 'plan'
      actor    1.44M  actor_gen d2t2p1@0-3 mb1, actor_train d1t2p2@0-3 mb1 (home)
      critic   1.44M  critic_inf d2t1p1@2-3 mb1, critic_train d1t2p2@0-3 mb1 (home)
      ...
      predicted iteration: 0.21 s (planner, cpu-gloo profile)
    iteration time: measured 1.90 s (median of iterations 2-4), predicted 0.21 s
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

if TYPE_CHECKING:
    from lightning_real.strategy import RealStrategy

MEASURED_ITERATIONS = 3
"""Iterations the measured time is the median of, after the first (which builds caches)."""


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def predicted_iteration_s(strategy: RealStrategy, module: Any) -> tuple[float | None, str]:
    """The planner's simulated iteration time of the run's workload and plan on a cluster of its
    world, and the hardware profile it assumed (None and the reason when it cannot tell)."""
    from lightning_real.planner.auto import cluster_for_world
    from lightning_real.planner.simulate import simulate
    from lightning_real.planner.workload import Workload

    plan = strategy.resolved_plan
    if plan is None:
        return None, "no plan yet"
    try:
        cluster = cluster_for_world(strategy.world_size, strategy.node_size)
        workload = Workload(module.real_graph(), module.real_specs(), strategy.features)
        result = simulate(workload, plan, cluster, check_memory=False)
    except (ValueError, KeyError) as e:  # a workload the cost model does not price
        return None, str(e)
    return result.time, cluster.hw.name


def role_summary(strategy: RealStrategy, module: Any, predicted: tuple[float | None, str]) -> list[str]:
    """The lines of the summary (see the module docstring); ``predicted`` as
    :func:`predicted_iteration_s` returns it."""
    graph = module.real_graph()
    built = module.runtime.pool.models if module.runtime is not None else {}
    specs = module.real_specs()
    homes = graph.home_calls()
    plan = strategy.resolved_plan
    name = plan.name if plan is not None else "?"
    name = "of the given layouts" if name == "plan" else repr(name)
    backend = strategy.process_group_backend or "?"
    lines = [
        f"{type(module).__name__} on {strategy.world_size} processes ({backend}, {strategy.node_size} per node), "
        f"plan {name}"
    ]
    width = max(len(r) for r in graph.roles())
    for role in graph.roles():
        params = _count(specs[role].num_params()) if role in built else "rule"
        calls = []
        for call in graph.calls:
            if call.role != role:
                continue
            home = " (home)" if homes.get(role) == call.name and role in built else ""
            calls.append(f"{call.name} {strategy.plan[call.name]} mb{strategy.microbatches[call.name]}{home}")
        lines.append(f"  {role:<{width}}  {params:>7}  {', '.join(calls)}")
    seconds, profile = predicted
    if seconds is not None:
        lines.append(f"  predicted iteration: {seconds:.3g} s (planner, {profile} profile)")
    else:
        lines.append(f"  predicted iteration: unknown ({profile})")
    return lines


def _say(trainer: Trainer, text: str) -> None:
    # Through the progress bar when there is one, so a live bar is not torn by the line.
    bar = trainer.progress_bar_callback
    if bar is not None and getattr(bar, "is_enabled", False):
        bar.print(text)
    else:
        print(text, flush=True)


class RoleSummary(Callback):
    """Prints :func:`role_summary` at the start of fit and, after a few iterations, the measured
    iteration time beside the prediction (rank 0 only)."""

    def __init__(self, measured_iterations: int = MEASURED_ITERATIONS) -> None:
        self.measured_iterations = measured_iterations
        """Iterations the measured time is the median of (after the first)."""
        self._times: list[float] = []
        self._predicted: float | None = None
        self._reported = False

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        strategy: Any = trainer.strategy
        predicted = predicted_iteration_s(strategy, pl_module)
        self._predicted = predicted[0]
        print("\n".join(role_summary(strategy, pl_module, predicted)), flush=True)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        elapsed = getattr(pl_module, "last_metrics", {}).get("timing_s/iteration")
        if not trainer.is_global_zero or elapsed is None or self._reported:
            return
        self._times.append(float(elapsed))
        if len(self._times) > self.measured_iterations:
            self._report(trainer)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and not self._reported and self._times:
            self._report(trainer)

    def _report(self, trainer: Trainer) -> None:
        self._reported = True
        times = self._times[1:] or self._times
        first = trainer.global_step - len(times) + 1
        which = (
            f"iteration {first}" if len(times) == 1 else f"median of iterations {first}-{trainer.global_step}"
        )
        predicted = f"predicted {self._predicted:.3g} s" if self._predicted is not None else "no prediction"
        _say(trainer, f"iteration time: measured {statistics.median(times):.3g} s ({which}), {predicted}")
