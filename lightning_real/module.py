"""RLHF LightningModules: a bundle of models (actor, critic, reward, reference) and PPO on top.

The module says *what* runs (the dataflow graph and the body of each call); RealStrategy says
*where* (the plan) and drives each training step through the runtime. Models are built in
:meth:`RLHFModule.real_setup`, once the strategy knows the plan, as megatron-core shards on the
home layout of each role; they are not submodules of the LightningModule (Lightning must not move
or wrap them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from lightning_real.layout import Layout
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import ModelSpec

ModelSource = str | Path | ModelSpec
"""An HF checkpoint folder, or a ModelSpec for a randomly initialised model (tests, demos)."""


@dataclass
class RealContext:
    """What the module hands the runtime after building its models on this rank."""

    call_fns: dict[str, Callable[..., Any]]
    """Body of each call: ``fn(shard, inputs) -> (outputs, metrics)``."""
    move: Callable[[str, Layout], tuple[Any, int]]
    """Makes a role's parameters available on a layout (see runtime.pool.ModelPool.move)."""
    release: Callable[[str, Layout], None]
    """Drops a role's copy after a call."""


def spec_of(source: ModelSource, head: str) -> ModelSpec:
    """The ModelSpec of a source, with the given head."""
    if isinstance(source, ModelSpec):
        return source.with_head(head)  # type: ignore[arg-type]
    path = Path(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {path} has no config.json (expected an HF checkpoint folder)")
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return ModelSpec.from_hf_config(cfg, head=head)  # type: ignore[arg-type]


def load_home(
    source: ModelSource, spec: ModelSpec, groups: Any, seed: int, init_value_head: bool = False
) -> ModelShard:
    """Build a role's home shard from an HF folder or a random init (same model under any layout).

    ``init_value_head``: a value-head model read from a causal-LM folder starts its head at zero
    (a critic initialised from the actor, a reward model from the SFT model).
    """
    if isinstance(source, ModelSpec):
        return ModelShard.from_canonical(spec, groups, random_canonical(spec, seed))
    from lightning_real.models.hf import load_hf

    return load_hf(source, groups, head=spec.head, init_value_head=init_value_head)


class RLHFModule(LightningModule):
    """Base of RLHF modules run by :class:`~lightning_real.strategy.RealStrategy`.

    Subclasses define :meth:`real_graph`, :meth:`real_specs`, :meth:`build_calls` and
    :meth:`make_source`. Optimization is manual: the models' optimizers live with their shards.
    """

    progress_bar_keys: tuple[str, ...] = ("reward/mean", "actor/pg_loss")
    """Metrics shown in Lightning's progress bar."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Lightning counts steps by optimizer steps; this parameterless-in-effect optimizer is
        # stepped once per iteration so that max_steps, checkpoint intervals and logging work.
        self._step_counter = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.pool: Any = None
        self.iteration = 0
        """Index of the iteration being run (the global step; seeds sampling)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self._step_counter], lr=0.0)

    # ---- the protocol RealStrategy uses -----------------------------------------------------------
    def real_graph(self) -> Any:
        raise NotImplementedError

    def real_specs(self) -> dict[str, ModelSpec]:
        """Model spec of each role (the planner and plan validation read them)."""
        raise NotImplementedError

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        """The source keys of one iteration from a dataloader batch (the same on every rank)."""
        raise NotImplementedError

    def real_setup(self, strategy: Any) -> RealContext:
        raise NotImplementedError

    def real_state_dict(self) -> dict[str, Any]:
        """This rank's shards and optimizer states, for checkpoints."""
        return {}

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`real_state_dict`."""

    # ---- a role's home copy: checkpoint state and HF export --------------------------------------
    def home_shard(self, role: str) -> ModelShard:
        """This rank's part of the persistent (home) copy of ``role``'s model (after setup)."""
        models = self.pool.models if self.pool is not None else {}
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

    def save_hf(self, role: str, folder: str | Path, copy_files_from: str | Path | None = None) -> Path:
        """Write ``role``'s model as an HF checkpoint folder that transformers loads.

        Collective: every rank calls it (ranks outside the role's home layout only wait). LM heads
        become ``*ForCausalLM``, value heads the family's ``*ForSequenceClassification``;
        ``copy_files_from`` adds an HF folder's non-weight files (tokenizer, generation config).
        The folder is swapped in atomically; a failure on any rank raises on every rank.
        """
        from lightning_real.distributed.agree import on_every_rank
        from lightning_real.models.hf import CheckpointError
        from lightning_real.models.hf import save_hf as write

        on_every_rank(
            lambda: write(self.home_shard(role), folder, copy_files_from),
            f"save_hf({role!r}, {folder}) failed",
            CheckpointError,
        )
        return Path(folder).absolute()

    # ---- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        strategy = self.trainer.strategy
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


_MODULES = {
    "SFTModule": "lightning_real.modules.sft",
    "PPOModule": "lightning_real.modules.ppo",
    "GRPOModule": "lightning_real.modules.grpo",
    "ReMaxModule": "lightning_real.modules.remax",
    "DPOModule": "lightning_real.modules.dpo",
    "RewardModelModule": "lightning_real.modules.rw",
}


def __getattr__(name: str) -> Any:
    # The algorithm modules live one per file under lightning_real.modules.
    if name in _MODULES:
        import importlib

        return getattr(importlib.import_module(_MODULES[name]), name)
    raise AttributeError(f"module 'lightning_real.module' has no attribute {name!r}")
