"""RealStrategy: a Lightning strategy in which every model function call has its own layout.

A thin adapter over Lightning's DDP launcher and process-group set-up: it never wraps the module
in DDP (each model is a megatron-core shard with its own groups), gives every rank the same
global batch (calls split it over their own data-parallel replicas), and hands the work to
helpers: the plan (:mod:`lightning_real.plans`, the planner for ``"search"``), the runtime
(:func:`lightning_real.runtime.build.build_runtime` builds the module's declared models with the
strategy's node size and features, :class:`lightning_real.runtime.executor.Executor` runs an
iteration) and checkpoints (:mod:`lightning_real.checkpoint.sharded`).

Failures are named: every process group has the one timeout (``timeout_s``), each rank keeps
its phase on a status board (:mod:`lightning_real.distributed.status`), a collective that fails
raises :class:`~lightning_real.distributed.status.RankFailure` naming the rank that died or did
not arrive, and the popen launcher reports a child that died (:mod:`lightning_real.launcher`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_real.checkpoint.rng import rng_states, set_rng_states
from lightning_real.checkpoint.sharded import LoadedCheckpoint, load_sharded, remove_folder, save_sharded
from lightning_real.data.position import EpochPositionLoader
from lightning_real.distributed.groups import GroupRegistry, collective_timeout
from lightning_real.distributed.status import (
    RankFailure,
    StatusBoard,
    describe_failure,
    exit_codes,
    is_collective_failure,
    shared_folder,
)
from lightning_real.features import RuntimeFeatures, precision_of
from lightning_real.layout import Layout
from lightning_real.loggers import finish_wandb_runs
from lightning_real.plans import Plan
from lightning_real.resume.roles import check_roles, role_specs
from lightning_real.runtime.executor import Executor, reduce_metrics
from lightning_real.runtime.trace import Event, Tracer, gather_events, summarize, to_chrome_trace

if TYPE_CHECKING:
    from lightning_real.module import RLHFModule

PlanArg = str | Path | Mapping[str, str | Layout] | Plan


def node_size(explicit: int | None, devices_per_node: int) -> int:
    """Devices per node: the one given, else torchrun's ``LOCAL_WORLD_SIZE``, else the devices
    Lightning runs per node (its cluster environment's processes on this machine)."""
    if explicit is not None:
        if not isinstance(explicit, int) or explicit < 1:
            raise ValueError(f"RealStrategy gpus_per_node={explicit!r}; allowed: an integer >= 1 or None")
        return explicit
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local is not None and local.isdigit() and int(local) > 0:
        return int(local)
    return max(1, devices_per_node)


class RealStrategy(DDPStrategy):
    """Per-call layouts, parameter reallocation and concurrent calls, for RLHF modules.

    Args:
        plan: ``"symmetric"`` (every call on all devices), ``"disjoint"`` (actor and reference on
            one half, critic and reward on the other), ``"search"`` (the planner's MCMC search),
            a path to a YAML plan, a mapping from call name to layout string, or a Plan.
        gpus_per_node: devices per node (reallocation prefers senders on the receiver's node, the
            planner prices links by it); None: torchrun's ``LOCAL_WORLD_SIZE``, else the devices
            Lightning starts per node.
        features: what the runtime runs (optimizer sharding, attention, recomputation, generation
            backend, offload); its precision is taken from the Trainer's ``precision``.
        trace_dir: where to write the Chrome trace of each logged step (None: no files).
        search_steps: MCMC steps when ``plan="search"``.
        timeout_s: seconds any collective may wait (the default group, every layout's groups, the
            rows' gloo group); None: 300 on CPU, 1800 on GPU. A rank that dies or stops
            answering fails the others within this (a dead one at once on gloo).
        process_group_backend: ``"nccl"`` or ``"gloo"``; defaults to NCCL with CUDA, gloo without.
            With NCCL, ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (unless set): a timed-out collective
            ends the process instead of hanging it.
    """

    strategy_name = "real"

    def __init__(
        self,
        plan: PlanArg = "symmetric",
        gpus_per_node: int | None = None,
        features: RuntimeFeatures | None = None,
        trace_dir: str | None = None,
        search_steps: int = 2000,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        if "timeout" in kwargs:
            raise ValueError(
                "RealStrategy takes timeout_s (seconds, one for every process group), not timeout"
            )
        kwargs.setdefault("start_method", "popen")
        super().__init__(**kwargs)
        if gpus_per_node is not None:
            node_size(gpus_per_node, 1)  # checked now, not after the processes started
        if timeout_s is not None:
            collective_timeout(timeout_s, "cpu")  # checked now, not after the processes started
        self.timeout_s = timeout_s
        """Collective timeout in seconds (None: by device, see ``collective_timeout``)."""
        self.status: StatusBoard | None = None
        """This rank's status board (after setup)."""
        self.resolved_plan: Plan | None = None
        """The checked plan being run (after setup)."""
        self.plan_arg = plan
        self.gpus_per_node = gpus_per_node
        self.features_arg = features
        self.trace_dir = trace_dir
        self.search_steps = search_steps
        self.registry: GroupRegistry | None = None
        self.plan: dict[str, Layout] = {}
        self.microbatches: dict[str, int] = {}
        """Microbatches per data-parallel replica of every call (the plan's, else the graph's)."""
        self.features: RuntimeFeatures = features or RuntimeFeatures()
        self._trainer_precision: str | None = None
        """The features the runtime runs (resolved at setup, with the Trainer's precision)."""
        self.node_size: int = 1
        """Devices per node the runtime and the planner use (resolved at setup)."""
        self.executor: Executor | None = None
        self.tracer: Tracer | None = None
        self.data_group: Any = None
        self.last_events: list[Event] = []
        """Every rank's timed events of the latest iteration (for breakdowns and benchmarks)."""

    # ---- Lightning hooks ------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        from lightning_real.launcher import RealLauncher

        assert self.cluster_environment is not None
        self._launcher = RealLauncher(
            self.cluster_environment,
            self.num_processes,
            self.num_nodes,
            status_folder=lambda: self.status.folder if self.status is not None else None,
        )

    @override
    def setup_distributed(self) -> None:
        self._timeout = collective_timeout(self.timeout_s, self.root_device.type)
        if self._get_process_group_backend() == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        super().setup_distributed()

    @override
    def on_exception(self, exception: BaseException) -> None:
        super().on_exception(exception)
        from lightning_real.launcher import RealLauncher

        if isinstance(self.launcher, RealLauncher):
            self.launcher.stop_children()  # they would wait for this process until the timeout

    @override
    def configure_ddp(self) -> None:
        # Models are megatron shards owned by the runtime; there is nothing for DDP to wrap.
        pass

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank reads the same global batch; each call slices it for its own dp replicas.
        return {"num_replicas": 1, "rank": 0}

    @override
    def setup(self, trainer: Any) -> None:
        # The runtime runs the Trainer's precision itself (bf16 shards, fp32 masters); Lightning's
        # plugin would also autocast the training step or cast the module, so it is replaced by
        # the plain one once its name is read.
        self.features = self.resolve_features()
        self.precision_plugin = Precision()
        from lightning_real.display import replace_default_callbacks

        replace_default_callbacks(trainer)  # the role summary and an iteration bar
        super().setup(trainer)
        self._setup_real()

    def resolve_features(self) -> RuntimeFeatures:
        """The features given, with the Trainer's precision (``Trainer(precision=...)``).

        The Trainer's default ('32-true') leaves the precision of ``features`` as it is; two
        different non-default precisions are an error naming both.
        """
        from dataclasses import replace

        if self._trainer_precision is None:
            plugin = self._precision_plugin
            self._trainer_precision = precision_of(getattr(plugin, "precision", None) if plugin else None)
        base = self.features_arg or RuntimeFeatures()
        given = self._trainer_precision
        if given == "32-true" or given == base.precision:
            return base
        if base.precision != "32-true":
            raise ValueError(
                f"Trainer(precision={given!r}) and RealStrategy(features=...precision={base.precision!r}) "
                "disagree; give one of them"
            )
        return replace(base, precision=given)  # type: ignore[arg-type]

    def _setup_real(self) -> None:
        from lightning_real.planner.auto import search_plan
        from lightning_real.plans import resolve_plan
        from lightning_real.runtime.build import RuntimeConfig, build_runtime

        module = self._module
        world = self.world_size
        self.node_size = node_size(self.gpus_per_node, len(self.parallel_devices or ()) or world)
        self.status = StatusBoard(shared_folder(self.global_rank), self.global_rank)
        self.registry = GroupRegistry(backend=self.process_group_backend, timeout=self._timeout)
        # batch rows always travel over gloo (small tensors; tags let producers send early)
        self.data_group = (
            dist.group.WORLD
            if dist.get_backend() == "gloo"
            else dist.new_group(backend="gloo", timeout=self._timeout)
        )
        graph = module.real_graph()
        specs = module.real_specs()
        plan = resolve_plan(
            self.plan_arg,
            graph,
            world,
            specs,
            search=lambda: search_plan(
                graph, specs, self.features, world, self.node_size, steps=self.search_steps
            ),
        )
        self.resolved_plan = plan
        self.plan = dict(plan.layouts)
        self.microbatches = dict(plan.microbatches)
        calls = graph.topological_order()
        # Group creation is collective: the same layouts, in the same order, on every rank.
        for call in calls:
            self.registry.for_layout(self.plan[call.name])
        self.tracer = Tracer(self.global_rank, status=self.status)
        runtime = build_runtime(
            graph, module.real_roles(), plan, self.registry, RuntimeConfig(self.node_size, self.features)
        )
        fns = module.real_setup(runtime)
        self.executor = Executor(
            calls,
            self.plan,
            fns,
            runtime.pool.move,
            self.global_rank,
            tracer=self.tracer,
            device=self.root_device,
            release=runtime.after_call,
            data_group=self.data_group,
        )

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and self._start_method != "popen":
            finish_wandb_runs(trainer.loggers)
        if self.status is not None and self.local_rank == 0:
            shutil.rmtree(self.status.folder, ignore_errors=True)  # one folder per host
        super().teardown()

    @contextlib.contextmanager
    def named_failures(self) -> Iterator[None]:
        """Re-raise a failed collective as a :class:`RankFailure` naming the rank that died or
        did not arrive, and what this rank was doing."""
        try:
            yield
        except Exception as e:
            if self.status is None or not is_collective_failure(e):
                raise
            child_procs = getattr(self.launcher, "child_procs", None)
            procs = child_procs() if child_procs is not None else {}
            raise RankFailure(describe_failure(self.status, self.world_size, e, exit_codes(procs))) from e

    def run_iteration(self, batch: dict[str, torch.Tensor], step: int = 0) -> dict[str, float]:
        """Run one dataflow iteration on every rank; returns the metrics of all ranks, reduced."""
        assert self.executor is not None and self.tracer is not None and self.status is not None
        self.tracer.step = step
        self.status.enter("iteration", step)
        with self.named_failures():
            result = self.executor.run(batch)
            self.status.enter("gathering metrics", step)
            events = gather_events(self.tracer.pop())
            metrics = reduce_metrics(result.metrics)
        self.status.enter("after the iteration", step)
        metrics.update(summarize(events))
        if self.trace_dir and self.global_rank == 0:
            to_chrome_trace(events, Path(self.trace_dir) / f"trace-step{step:05d}.json")
        self.last_events = events
        return metrics

    # ---- checkpoints: one folder per checkpoint, one shard file per rank, written atomically ----
    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        # The models are built in setup, on the plan's layouts; saved shards load into them.
        return True

    @override
    def process_dataloader(self, dataloader: object) -> object:
        # Lightning restores its loop counters on resume but restarts a plain DataLoader at the
        # epoch's first batch; the training loader starts where the counters stand instead.
        if self._module.trainer.training:
            return EpochPositionLoader(dataloader, self._epoch_position)
        return dataloader

    def _epoch_position(self) -> int:
        """Batches of the current epoch the fit loop has already consumed (restored on resume)."""
        return int(self._module.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    @property
    def _module(self) -> RLHFModule:
        """The RLHF module being run (after Lightning connected it)."""
        from lightning_real.module import RLHFModule

        module = self.lightning_module
        if not isinstance(module, RLHFModule):
            raise TypeError(
                f"RealStrategy needs an RLHF module (e.g. lightning_real.PPOModule); got {type(module).__name__}"
            )
        return module

    def _plan_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in sorted(self.plan.items())}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``filepath`` as a folder of per-rank shards (:func:`~lightning_real.checkpoint.sharded.save_sharded`)."""
        module = self._module

        def shard() -> dict[str, Any]:
            return {"module": module.real_state_dict(), "rng": rng_states()}

        def meta() -> dict[str, Any]:
            data = {k: v for k, v in checkpoint.items() if k != "state_dict"}
            data["plan"] = self._plan_strings()
            data["roles"] = role_specs(module.trained_specs())
            return data

        path = Path(filepath).absolute()
        step = checkpoint.get("global_step")
        phase = (
            self.status.phase(f"checkpoint write {path.name}", step)
            if self.status
            else contextlib.nullcontext()
        )
        with self.named_failures(), phase:
            save_sharded(path, self.global_rank, self.world_size, shard, meta)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's state from ``meta.pt`` plus the model states for this rank: its own shard
        (``real_shard``, ``real_rng``) under the checkpoint's plan and world size, every rank's
        (``real_shards``) under another, resliced in :meth:`load_model_state_dict`."""
        specs = self._module.trained_specs()
        loaded = load_sharded(
            Path(checkpoint_path),
            self.global_rank,
            self.world_size,
            self._plan_strings(),
            check_meta=lambda folder, meta: check_roles(folder, meta.get("roles"), specs),
        )
        meta = loaded.meta
        meta["state_dict"] = {}
        if loaded.same_layout:
            shard = loaded.shards[self.global_rank]
            meta["real_shard"] = shard["module"]
            meta["real_rng"] = shard["rng"]
            return meta
        meta["real_shards"] = [loaded.shards[r]["module"] for r in sorted(loaded.shards)]
        meta["real_where"] = f"checkpoint {loaded.folder}"
        if len(loaded.shards) == self.world_size:
            meta["real_rng"] = loaded.shards[self.global_rank]["rng"]
        self._announce_reslice(loaded)
        return meta

    def _announce_reslice(self, loaded: LoadedCheckpoint) -> None:
        """One line on rank 0: which plan and world the checkpoint came from, and the RNG's fate."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        saved = len(loaded.shards)
        rng = (
            "random states restored per rank"
            if saved == self.world_size
            else f"random states not restored (they are per rank; {saved} saved, {self.world_size} now)"
        )
        rank_zero_info(
            f"resuming {loaded.folder.name} (plan {loaded.meta.get('plan')} on {saved} ranks) under plan "
            f"{self._plan_strings()} on {self.world_size} ranks: models and optimizer states resliced, {rng}"
        )

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "real_shard" in checkpoint:
            self._module.load_real_state_dict(checkpoint["real_shard"])
        if "real_shards" in checkpoint:
            self._module.load_resharded_state_dict(checkpoint["real_shards"], checkpoint["real_where"])
        if "real_rng" in checkpoint:
            # Restored last, after setup consumed whatever randomness building the models took.
            set_rng_states(checkpoint["real_rng"])

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        remove_folder(Path(filepath), self.global_rank)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "real", cls, description="Per-call layouts with parameter reallocation (lightning-real)"
        )
        strategy_registry.register(
            "real_spawn", cls, description="RealStrategy with the spawn start method", start_method="spawn"
        )


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "real" not in StrategyRegistry:
        RealStrategy.register_strategies(StrategyRegistry)


_register()
