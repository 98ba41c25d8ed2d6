"""RealStrategy: a Lightning strategy in which every model function call has its own layout.

It is a thin adapter over Lightning's DDP launcher and process-group set-up: it never wraps the
module in DDP (each model is a megatron-core shard with its own groups), gives every rank the
same global batch (calls split it over their own data-parallel replicas), builds the plan and
the per-layout process groups in ``setup``, and lets the module drive one dataflow iteration per
training step through :meth:`RealStrategy.run_iteration`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.layout import Layout
from lightning_real.runtime.executor import Executor, reduce_metrics
from lightning_real.runtime.trace import Tracer, gather_events, summarize, to_chrome_trace

PlanArg = str | Mapping[str, str | Layout]


class RealStrategy(DDPStrategy):
    """Per-call layouts, parameter reallocation and concurrent calls, for RLHF modules.

    Args:
        plan: ``"symmetric"`` (every call on all devices), ``"disjoint"`` (actor and reference on
            one half, critic and reward on the other), ``"search"`` (the planner's MCMC search),
            a path to a YAML plan, or a mapping from call name to layout string.
        gpus_per_node: devices per node, used to prefer senders on the same node.
        trace_dir: where to write the Chrome trace of each logged step (None: no files).
        search_steps: MCMC steps when ``plan="search"``.
        process_group_backend: ``"nccl"`` or ``"gloo"``; defaults to NCCL with CUDA, gloo without.
    """

    strategy_name = "real"

    def __init__(
        self,
        plan: PlanArg = "symmetric",
        gpus_per_node: int = 8,
        trace_dir: str | None = None,
        search_steps: int = 2000,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("start_method", "popen")
        super().__init__(**kwargs)
        self.plan_arg = plan
        self.gpus_per_node = gpus_per_node
        self.trace_dir = trace_dir
        self.search_steps = search_steps
        self.registry: GroupRegistry | None = None
        self.plan: dict[str, Layout] = {}
        self.executor: Executor | None = None
        self.tracer: Tracer | None = None
        self.data_group: Any = None
        self.last_events: list = []
        """Every rank's timed events of the latest iteration (for breakdowns and benchmarks)."""

    # ---- Lightning hooks ------------------------------------------------------------------------
    @override
    def configure_ddp(self) -> None:
        # Models are megatron shards owned by the module; there is nothing for DDP to wrap.
        pass

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank reads the same global batch; each call slices it for its own dp replicas.
        return {"num_replicas": 1, "rank": 0}

    @override
    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self._setup_real()

    def _setup_real(self) -> None:
        from lightning_real.plans import resolve_plan

        module = self.lightning_module
        if not hasattr(module, "real_graph"):
            raise TypeError(
                f"RealStrategy needs an RLHF module (e.g. lightning_real.PPOModule); got {type(module).__name__}"
            )
        world = self.world_size
        self.registry = GroupRegistry(backend=self.process_group_backend)
        # batch rows always travel over gloo (small tensors; tags let producers send early)
        self.data_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        graph = module.real_graph()
        specs = module.real_specs()
        plan = resolve_plan(
            self.plan_arg,
            graph,
            world,
            specs,
            gpus_per_node=self.gpus_per_node,
            search_steps=self.search_steps,
        )
        self.plan = {name: lay.resolve(world) for name, lay in plan.layouts.items()}
        calls = graph.topological_order()
        # Group creation is collective: the same layouts, in the same order, on every rank.
        for call in calls:
            self.registry.for_layout(self.plan[call.name])
        self.tracer = Tracer(self.global_rank)
        ctx = module.real_setup(self)
        self.executor = Executor(
            calls,
            self.plan,
            ctx.call_fns,
            ctx.move,
            self.global_rank,
            tracer=self.tracer,
            device=self.root_device,
            release=ctx.release,
            data_group=self.data_group,
        )

    def run_iteration(self, batch: dict[str, torch.Tensor], step: int = 0) -> dict[str, float]:
        """Run one dataflow iteration on every rank; returns the metrics of all ranks, reduced."""
        assert self.executor is not None and self.tracer is not None
        self.tracer.step = step
        result = self.executor.run(batch)
        events = gather_events(self.tracer.pop())
        metrics = reduce_metrics(result.metrics)
        metrics.update(summarize(events))
        if self.trace_dir and self.global_rank == 0:
            to_chrome_trace(events, Path(self.trace_dir) / f"trace-step{step:05d}.json")
        self.last_events = events
        return metrics

    # ---- checkpoints: one shard file per rank, written atomically ------------------------------
    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``filepath`` as a folder: ``meta.pt`` (rank 0) and ``shard-rank{r}.pt`` per rank.

        All ranks write into a temporary folder first; only when every rank succeeded does rank 0
        swap it in, so a crash during a save leaves the previous checkpoint intact.
        """
        path = Path(filepath)
        tmp = path.with_name(path.name + ".tmp")
        module = self.lightning_module
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier("real_ckpt_mkdir")
        shard = module.real_state_dict() if hasattr(module, "real_state_dict") else {}
        torch.save(shard, tmp / f"shard-rank{self.global_rank}.pt")
        if self.global_rank == 0:
            meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
            meta["world_size"] = self.world_size
            meta["plan"] = {k: str(v) for k, v in self.plan.items()}
            torch.save(meta, tmp / "meta.pt")
        self.barrier("real_ckpt_written")
        if self.global_rank == 0:
            old = path.with_name(path.name + ".old")
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("real_ckpt_done")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(checkpoint_path)
        meta_file = path / "meta.pt"
        if not meta_file.exists():
            raise FileNotFoundError(
                f"checkpoint {path} has no meta.pt; is it a RealStrategy checkpoint folder?"
            )
        meta = torch.load(meta_file, weights_only=False)
        if meta.get("world_size") != self.world_size:
            raise ValueError(
                f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {self.world_size}"
            )
        shard = torch.load(path / f"shard-rank{self.global_rank}.pt", weights_only=False)
        meta["state_dict"] = {}
        meta["real_shard"] = shard
        return meta

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        module = self.lightning_module
        if "real_shard" in checkpoint and hasattr(module, "load_real_state_dict"):
            module.load_real_state_dict(checkpoint["real_shard"])

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.global_rank == 0:
            shutil.rmtree(filepath, ignore_errors=True)

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
