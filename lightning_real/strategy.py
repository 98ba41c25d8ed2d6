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
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_real.distributed.agree import on_every_rank
from lightning_real.distributed.groups import GroupRegistry
from lightning_real.layout import Layout
from lightning_real.models.hf import CheckpointError
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
        self.microbatches: dict[str, int] = {}
        """Microbatches per data-parallel replica of every call (the plan's, else the graph's)."""
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
        self.microbatches = dict(plan.microbatches)
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

    @override
    def teardown(self) -> None:
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if trainer is not None and self._start_method != "popen":
            _finish_wandb_runs(trainer.loggers)
        super().teardown()

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
        if self.lightning_module.trainer.training:
            return EpochPositionLoader(dataloader, self._epoch_position)
        return dataloader

    def _epoch_position(self) -> int:
        """Batches of the current epoch the fit loop has already consumed (restored on resume)."""
        return int(self.lightning_module.trainer.fit_loop.epoch_loop.batch_progress.current.ready)

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        """Write ``filepath`` as a folder: ``shard-rank{r}.pt`` per rank, then ``meta.pt``.

        Each rank's shard holds its part of the models and optimizer states (the module's
        ``real_state_dict``) and its RNG states. Every rank writes into ``<name>.tmp`` beside the
        target; only when all succeeded does rank 0 add ``meta.pt`` (Lightning's loop, optimizer
        and callback state, the plan, the shard list) and rename the folder into place. A failure
        on any rank raises on every rank and leaves earlier checkpoints as they were; a crash
        leaves at most a ``.tmp`` folder, which is never loaded. All ranks must share the
        filesystem of ``filepath``.
        """
        path = Path(filepath).absolute()
        tmp = path.with_name(path.name + TMP_SUFFIX)
        rank = self.global_rank

        def prepare() -> None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)

        def write_shard() -> None:
            state = {"module": self.lightning_module.real_state_dict(), "rng": rng_states()}
            _write(state, tmp / shard_file(rank))

        self._on_every_rank(f"checkpoint {path}: creating {tmp.name}", prepare)

        def publish() -> None:
            if rank == 0:
                meta = {k: v for k, v in checkpoint.items() if k != "state_dict"}
                meta.update(world_size=self.world_size, plan=self._plan_strings())
                meta["shards"] = [shard_file(r) for r in range(self.world_size)]
                _write(meta, tmp / META_FILE)  # last: a folder with meta.pt is complete
                _swap_in(tmp, path)

        try:
            self._on_every_rank(f"checkpoint {path}: writing the shards", write_shard)
            self._on_every_rank(f"checkpoint {path}: publishing", publish)
        except CheckpointError:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _on_every_rank(self, what: str, fn: Any) -> None:
        """Run ``fn`` here; if it failed on any rank, raise :class:`CheckpointError` on every rank."""
        on_every_rank(fn, f"{what} failed; nothing was replaced", CheckpointError)

    def _plan_strings(self) -> dict[str, str]:
        return {k: str(v) for k, v in sorted(self.plan.items())}

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's state from ``meta.pt`` plus this rank's shard (``real_shard``, ``real_rng``).

        The run must have the checkpoint's world size and plan: shards and optimizer states are
        per layout position. Every rank checks the whole folder, so every rank fails alike.
        """
        path = checkpoint_folder(Path(checkpoint_path))
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=False)
        if meta.get("world_size") != self.world_size:
            raise CheckpointError(
                f"checkpoint {path} was written by {meta.get('world_size')} ranks; this run has {self.world_size}"
            )
        if meta.get("plan") != self._plan_strings():
            raise CheckpointError(
                f"checkpoint {path} was written under plan {meta.get('plan')}; this run's plan is "
                f"{self._plan_strings()} (shards and optimizer states belong to their layouts)"
            )
        missing = [name for name in meta.get("shards", []) if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing}")
        shard = torch.load(path / shard_file(self.global_rank), map_location="cpu", weights_only=False)
        meta["state_dict"] = {}
        meta["real_shard"] = shard["module"]
        meta["real_rng"] = shard["rng"]
        return meta

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if "real_shard" in checkpoint:
            self.lightning_module.load_real_state_dict(checkpoint["real_shard"])
        if "real_rng" in checkpoint:
            # Restored last, after setup consumed whatever randomness building the models took.
            set_rng_states(checkpoint["real_rng"])

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.global_rank == 0:
            path = Path(filepath)
            if path.exists():
                # Renamed first, so a half-deleted folder never carries a checkpoint's name.
                gone = path.with_name(f".{path.name}.removing-{os.getpid()}")
                os.replace(path, gone)
                shutil.rmtree(gone, ignore_errors=True)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        strategy_registry.register(
            "real", cls, description="Per-call layouts with parameter reallocation (lightning-real)"
        )
        strategy_registry.register(
            "real_spawn", cls, description="RealStrategy with the spawn start method", start_method="spawn"
        )


# ---- checkpoint helpers -------------------------------------------------------------------------
META_FILE = "meta.pt"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


def shard_file(rank: int) -> str:
    """Name of rank ``rank``'s file in a checkpoint folder."""
    return f"shard-rank{rank}.pt"


def checkpoint_folder(path: Path) -> Path:
    """The complete checkpoint folder for ``path``.

    Replacing a folder takes two renames (old aside, new in); a crash between them leaves only
    ``<name>.old``, the previous complete checkpoint, which is then used.
    """
    if (path / META_FILE).is_file():
        return path
    old = path.with_name(path.name + OLD_SUFFIX)
    if not path.exists() and (old / META_FILE).is_file():
        rank_zero_warn(f"checkpoint {path} is missing; loading {old.name}, left by an interrupted save")
        return old
    raise CheckpointError(f"{path} is not a complete RealStrategy checkpoint folder (no {META_FILE})")


def _write(obj: Any, file: Path) -> None:
    """``torch.save`` that reaches the disk before returning (a later rename must not outrun it)."""
    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``; an existing ``path`` is removed only afterwards."""
    _fsync_dir(tmp)
    old = path.with_name(path.name + OLD_SUFFIX)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def rng_states() -> dict[str, Any]:
    """This process's random states (torch CPU and current CUDA device, Python, NumPy)."""
    import random

    import numpy as np

    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore :func:`rng_states`."""
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


class EpochPositionLoader:
    """A training loader whose iteration starts at the batch the fit loop has reached in the epoch.

    ``position()`` is read when the first batch is requested, after Lightning has restored and
    reset its counters: 0 at an epoch's start, the consumed batches after a mid-epoch resume.
    Those batches are read and dropped; the order itself is the sampler's, a function of its
    seed and the epoch Lightning sets (``sampler`` and ``batch_sampler`` are passed through).
    """

    def __init__(self, loader: Any, position: Callable[[], int]) -> None:
        self.loader = loader
        self.position = position

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        skip = self.position()
        # A DataLoader iterator draws its worker seed from the global RNG; drawing it from a
        # fork keeps the global RNG where a restored checkpoint put it.
        with torch.random.fork_rng(devices=[]):
            it = iter(self.loader)
        for _ in range(skip):
            if next(it, _END) is _END:
                return
        yield from it

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "position"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning may set loader attributes (worker_init_fn); they belong to the loader.
        if name in ("loader", "position"):
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)


_END = object()


def _finish_wandb_runs(loggers: list[Any]) -> None:
    """Flush and close the W&B runs of a spawned worker.

    Workers started by multiprocessing end with ``os._exit``, which skips the exit hooks that
    would flush a W&B run; without this its last records (in offline mode: all of them, on a
    short run) never reach the run file.
    """
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if type(logger).__name__ == "WandbLogger" and run is not None and hasattr(run, "finish"):
            run.finish()


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    if "real" not in StrategyRegistry:
        RealStrategy.register_strategies(StrategyRegistry)


_register()
