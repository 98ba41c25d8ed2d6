"""Supervised fine-tuning of the actor, through the same graph, plans and runtime as RLHF."""

from __future__ import annotations

from typing import Any

import torch

from lightning_real.models.spec import ModelSpec
from lightning_real.module import ModelSource, RealContext, RLHFModule, load_home, spec_of


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

        self.engine = TrainEngine(
            home, loss_fn, TrainConfig(n_mbs=strategy.microbatches["actor_train"], optim=self.optim)
        )
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
        return {"actor": self.shard_state_dict("actor"), "actor_optim": self.engine.state_dict()}

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        self.load_shard_state_dict("actor", state["actor"])
        self.engine.load_state_dict(state["actor_optim"])
