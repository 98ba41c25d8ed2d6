"""The base of the RLHF LightningModules: what a module declares and what it gets back.

A module says *what* runs: its dataflow graph (:meth:`RLHFModule.real_graph`), its models
(:meth:`RLHFModule.real_roles`: where each comes from, how the trained ones learn) and the body
of each call (:meth:`RLHFModule.real_calls`). RealStrategy says *where* (the plan) and the
runtime *builds* (:func:`lightning_real.runtime.build.build_runtime`): every role's home shard
on its home call's layout, reallocators and training engines, with the strategy's node size and
runtime features. The models are megatron-core shards owned by the runtime, not submodules of
the LightningModule (Lightning must not move or wrap them).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from lightning.pytorch import LightningModule
from typing_extensions import override

from lightning_real.dataflow import DataflowGraph
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource, spec_of
from lightning_real.models.spec import ModelSpec
from lightning_real.registry import MODULE_PATHS
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.pool import ModelPool
from lightning_real.runtime.roles import RoleDecl

if TYPE_CHECKING:
    from lightning_real.models.train import TrainEngine
    from lightning_real.strategy import RealStrategy

__all__ = ["ModelSource", "RLHFModule", "spec_of"]

Rows = dict[str, torch.Tensor]


class RLHFModule(LightningModule):
    """Base of RLHF modules run by :class:`~lightning_real.strategy.RealStrategy`.

    Subclasses define :meth:`real_graph`, :meth:`real_roles`, :meth:`real_calls` and
    :meth:`make_source`; algorithm state beyond weights and optimizers goes in
    :meth:`extra_state`. Optimization is manual: the models' optimizers live with their shards.
    """

    progress_bar_keys: tuple[str, ...] = ("reward/mean", "actor/pg_loss")
    """Metrics shown in Lightning's progress bar."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Lightning counts steps by optimizer steps; this parameterless-in-effect optimizer is
        # stepped once per iteration so that max_steps, checkpoint intervals and logging work.
        self._step_counter = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.runtime: RuntimeContext | None = None
        """The runtime built for this module on this rank (set by :meth:`real_setup`)."""
        self.iteration = 0
        """Index of the iteration being run (the global step; seeds sampling)."""
        self.last_metrics: dict[str, float] = {}
        """Metrics of the latest iteration, reduced over every rank."""

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self._step_counter], lr=0.0)

    # ---- what the module declares ---------------------------------------------------------------
    def real_graph(self) -> DataflowGraph:
        """The dataflow graph of one iteration."""
        raise NotImplementedError

    def real_roles(self) -> tuple[RoleDecl, ...]:
        """The module's models, in the order every rank builds them."""
        raise NotImplementedError

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        """The body of every call of the graph, given the built runtime of this rank."""
        raise NotImplementedError

    def make_source(self, batch: Any) -> Rows:
        """The source keys of one iteration from a dataloader batch (the same on every rank)."""
        raise NotImplementedError

    def real_specs(self) -> dict[str, ModelSpec]:
        """Model spec of each role the graph uses (the planner and plan checks read them)."""
        roles = self.real_graph().roles()
        return {d.role: d.spec for d in self.real_roles() if d.role in roles}

    def extra_state(self) -> dict[str, Any]:
        """Algorithm state beyond weights and optimizers (KL controllers, running statistics)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    # ---- what the strategy hands back -----------------------------------------------------------
    def real_setup(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        """Keep the built runtime; the call bodies for the executor."""
        self.runtime = ctx
        return self.real_calls(ctx)

    def _runtime(self) -> RuntimeContext:
        if self.runtime is None:
            raise RuntimeError(
                f"{type(self).__name__} has no runtime yet: the models are built when RealStrategy sets up"
            )
        return self.runtime

    @property
    def pool(self) -> ModelPool:
        """Every role's home shard on this rank (after setup)."""
        return self._runtime().pool

    @property
    def engines(self) -> dict[str, TrainEngine]:
        """The training engine of each trained role (after setup)."""
        return self._runtime().engines

    # ---- a role's home copy: checkpoint state and HF export --------------------------------------
    def home_shard(self, role: str) -> ModelShard:
        """This rank's part of the persistent (home) copy of ``role``'s model (after setup)."""
        models = self.runtime.pool.models if self.runtime is not None else {}
        if role not in models:
            have = ", ".join(models) or "none (the models are built when the strategy sets up)"
            raise KeyError(f"{type(self).__name__} has no model for role {role!r}; roles: {have}")
        return models[role].home

    def shard_state_dict(self, role: str) -> dict[str, torch.Tensor]:
        """A host copy of this rank's parameters of ``role``'s home copy, by local name."""
        return {ps.local_name: p.detach().to("cpu", copy=True) for ps, p in self.home_shard(role).params()}

    def load_shard_state_dict(self, role: str, state: dict[str, torch.Tensor]) -> None:
        """Copy :meth:`shard_state_dict` back into ``role``'s home copy (same layout position)."""
        params = self.home_shard(role).params()
        names = {ps.local_name for ps, _ in params}
        if names != set(state):
            raise ValueError(
                f"saved parameters of {role!r} do not match this rank's shard "
                f"(missing {sorted(names - set(state))[:3]}, unexpected {sorted(set(state) - names)[:3]}); "
                "was the checkpoint written under another plan?"
            )
        with torch.no_grad():
            for ps, p in params:
                p.copy_(state[ps.local_name])

    def real_state_dict(self) -> dict[str, Any]:
        """This rank's shards and optimizer states of the trained roles, and :meth:`extra_state`.

        Frozen models are rebuilt from their sources rather than written each time.
        """
        state: dict[str, Any] = {"extra": self.extra_state()}
        for role, engine in self.engines.items():
            state[role] = self.shard_state_dict(role)
            state[f"{role}_optim"] = engine.state_dict()
        return state

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`real_state_dict` (saved on this rank's layout positions)."""
        for role, engine in self.engines.items():
            self.load_shard_state_dict(role, state[role])
            engine.load_state_dict(state[f"{role}_optim"])
        self.load_extra_state(state.get("extra", {}))

    def trained_specs(self) -> dict[str, ModelSpec]:
        """The model spec of each trained role (after setup)."""
        return {role: engine.shard.spec for role, engine in self.engines.items()}

    def load_resharded_state_dict(self, states: list[dict[str, Any]], where: str) -> None:
        """Restore :meth:`real_state_dict` of every rank of a run under another plan or world
        size (``states[r]``: rank r's): each trained role reassembled in canonical coordinates
        and sliced onto this rank's layout positions (:mod:`lightning_real.resume.canonical`)."""
        from lightning_real.resume.canonical import assemble, load_canonical

        for role, engine in self.engines.items():
            saved = [(s.get(role, {}), s.get(f"{role}_optim", {})) for s in states]
            load_canonical(engine, assemble(engine.shard.spec, role, saved, where))
        self.load_extra_state(states[0].get("extra", {}))

    def save_hf(self, role: str, folder: str | Path, copy_files_from: str | Path | None = None) -> Path:
        """Write ``role``'s model as an HF checkpoint folder that transformers loads.

        Collective: every rank calls it (ranks outside the role's home layout only wait). LM heads
        become ``*ForCausalLM``, value heads the family's ``*ForSequenceClassification``;
        ``copy_files_from`` adds an HF folder's non-weight files (tokenizer, generation config).
        The folder is swapped in atomically; a failure on any rank raises on every rank.
        """
        from lightning_real.checkpoint.folders import CheckpointError
        from lightning_real.distributed.agree import on_every_rank
        from lightning_real.models.hf import save_hf as write

        on_every_rank(
            lambda: write(self.home_shard(role), folder, copy_files_from),
            f"save_hf({role!r}, {folder}) failed",
            CheckpointError,
        )
        return Path(folder).absolute()

    # ---- Lightning ----------------------------------------------------------------------------
    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        strategy = cast("RealStrategy", self.trainer.strategy)
        self.iteration = self.global_step
        start = time.perf_counter()
        metrics = strategy.run_iteration(self.make_source(batch), step=self.global_step)
        elapsed = time.perf_counter() - start
        metrics["timing_s/iteration"] = elapsed
        if "perf/tokens" in metrics:
            # tokens of the iteration's sequences per second per device, as verl reports it
            metrics["perf/throughput"] = metrics["perf/tokens"] / elapsed / strategy.world_size
        opt = self.optimizers()
        opt.step()  # type: ignore[union-attr]
        self.log_dict(
            {k: float(v) for k, v in metrics.items()}, prog_bar=False, on_step=True, rank_zero_only=True
        )
        for key in self.progress_bar_keys:
            if key in metrics:
                self.log(key.replace("/", "_"), float(metrics[key]), prog_bar=True, rank_zero_only=True)
        self.last_metrics = metrics


def __getattr__(name: str) -> Any:
    # The algorithm modules live one per file under lightning_real.modules (lightning_real.registry).
    if name in MODULE_PATHS:
        import importlib

        return getattr(importlib.import_module(MODULE_PATHS[name]), name)
    raise AttributeError(f"module 'lightning_real.module' has no attribute {name!r}")
