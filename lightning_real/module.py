"""RLHF LightningModules: a bundle of models (actor, critic, reward, reference) and PPO on top.

The module says *what* runs (the dataflow graph and the body of each call); RealStrategy says
*where* (the plan) and drives each training step through the runtime. Models are built in
:meth:`RLHFModule.real_setup`, once the strategy knows the plan, as megatron-core shards on the
home layout of each role; they are not submodules of the LightningModule (Lightning must not move
or wrap them).
"""

from __future__ import annotations

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


def load_home(source: ModelSource, spec: ModelSpec, groups: Any, seed: int) -> ModelShard:
    """Build a role's home shard from an HF folder or a random init (same model under any layout)."""
    if isinstance(source, ModelSpec):
        return ModelShard.from_canonical(spec, groups, random_canonical(spec, seed))
    from lightning_real.models.hf import load_hf

    return load_hf(source, groups, head=spec.head)


class RLHFModule(LightningModule):
    """Base of RLHF modules run by :class:`~lightning_real.strategy.RealStrategy`.

    Subclasses define :meth:`real_graph`, :meth:`real_specs`, :meth:`build_calls` and
    :meth:`make_source`. Optimization is manual: the models' optimizers live with their shards.
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        # Lightning counts steps by optimizer steps; this parameterless-in-effect optimizer is
        # stepped once per iteration so that max_steps, checkpoint intervals and logging work.
        self._step_counter = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.pool: Any = None

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

    # ---- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        strategy = self.trainer.strategy
        metrics = strategy.run_iteration(self.make_source(batch), step=self.global_step)
        opt = self.optimizers()
        opt.step()  # type: ignore[union-attr]
        self.log_dict(
            {k: float(v) for k, v in metrics.items()}, prog_bar=False, on_step=True, rank_zero_only=True
        )
        for key in ("reward/mean", "actor/pg_loss"):
            if key in metrics:
                self.log(key.replace("/", "_"), float(metrics[key]), prog_bar=True, rank_zero_only=True)
        self.last_metrics = metrics


class SFTModule(RLHFModule):
    """Supervised fine-tuning of the actor through the same graph, plans and runtime as RLHF.

    Args:
        actor: HF checkpoint folder or ModelSpec (random init).
        batch_size: global rows per step (the data module's batch size).
        n_mbs: microbatches per data-parallel replica.
        optim: AdamW settings.
        seed: seed of a random init.
    """

    def __init__(
        self,
        actor: ModelSource,
        batch_size: int,
        n_mbs: int = 1,
        optim: Any = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from lightning_real.models.optim import OptimConfig

        self.actor_source = actor
        self.batch_size = batch_size
        self.n_mbs = n_mbs
        self.optim = optim or OptimConfig(lr=1e-4)
        self.seed = seed
        self.spec = spec_of(actor, "lm")

    def real_graph(self) -> Any:
        from lightning_real.dataflow import sft_graph

        return sft_graph(self.batch_size, self.n_mbs)

    def real_specs(self) -> dict[str, ModelSpec]:
        return {"actor": self.spec}

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        from lightning_real.dataflow import SFT_SOURCES

        return {k: batch[k] for k in SFT_SOURCES}

    def real_setup(self, strategy: Any) -> RealContext:
        from lightning_real.algorithms.sft import sft_loss
        from lightning_real.models.train import TrainConfig, TrainEngine
        from lightning_real.models.vocab_parallel import vocab_parallel_logprobs
        from lightning_real.realloc import Reallocator
        from lightning_real.runtime.pool import ModelPool, PooledModel

        groups = strategy.registry.for_layout(strategy.plan["actor_train"])
        home = load_home(self.actor_source, self.spec, groups, self.seed)

        def loss_fn(out: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            lp = vocab_parallel_logprobs(out[:, :-1], mb["input_ids"][:, 1:], self.engine.tp_group)
            return sft_loss(lp, mb["loss_mask"], reduction="sum")

        self.engine = TrainEngine(home, loss_fn, TrainConfig(n_mbs=self.n_mbs, optim=self.optim))
        self.pool = ModelPool()
        self.pool.add(PooledModel("actor", home, Reallocator(self.spec, strategy.registry)))

        def actor_train(shard: Any, x: dict[str, torch.Tensor]) -> tuple[dict, dict[str, float]]:
            batch = {
                "input_ids": x["input_ids"],
                "attention_mask": x["attention_mask"],
                "loss_mask": x["loss_mask"][:, 1:].float(),  # scores token t+1 at position t
            }
            m = self.engine.step(batch)
            return {}, {"actor/sft_loss": m["loss"], "actor/grad_norm": m["grad_norm"], "actor/lr": m["lr"]}

        return RealContext({"actor_train": actor_train}, self.pool.move, self.pool.release)

    def real_state_dict(self) -> dict[str, Any]:
        home = self.pool.models["actor"].home
        params = {ps.local_name: p.detach().clone() for ps, p in home.params()}
        return {"actor": params, "actor_optim": self.engine.state_dict()}

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        home = self.pool.models["actor"].home
        with torch.no_grad():
            for ps, p in home.params():
                p.copy_(state["actor"][ps.local_name])
        self.engine.load_state_dict(state["actor_optim"])
