"""Supervised fine-tuning of the actor, through the same graph, plans and runtime as RLHF."""

from __future__ import annotations

from typing import Any

import torch

from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import SFT_SOURCES
from lightning_real.graphs.sft import sft_graph
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource, spec_of
from lightning_real.module import RLHFModule, Rows
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import RoleDecl, Training


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
        optim: OptimConfig | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.actor_source = actor
        self.batch_size = batch_size
        self.n_mbs = n_mbs
        self.optim = optim or OptimConfig(lr=1e-4)
        self.seed = seed
        self.spec = spec_of(actor, "lm")

    def real_graph(self) -> DataflowGraph:
        return sft_graph(self.batch_size, self.n_mbs)

    def real_roles(self) -> tuple[RoleDecl, ...]:
        # norm_key: the loss is a mean over the response tokens of the global batch.
        training = Training(self._loss, self.optim, norm_key="loss_mask")
        return (RoleDecl("actor", self.actor_source, self.spec, self.seed, training=training),)

    def make_source(self, batch: Any) -> Rows:
        return {k: batch[k] for k in SFT_SOURCES}

    def _loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from lightning_real.algorithms.sft import sft_loss
        from lightning_real.models.vocab_parallel import next_token_logprobs

        lp = next_token_logprobs(out, mb["input_ids"], self.engines["actor"].tp_group)
        return sft_loss(lp, mb["loss_mask"], reduction="sum")

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        engine = ctx.engine("actor")

        def actor_train(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
            batch = {
                "input_ids": x["input_ids"],
                "attention_mask": x["attention_mask"],
                "loss_mask": x["loss_mask"][:, 1:].float(),  # scores token t+1 at position t
            }
            m = engine.step(batch)
            return {}, {"actor/sft_loss": m["loss"], "actor/grad_norm": m["grad_norm"], "actor/lr": m["lr"]}

        return {"actor_train": actor_train}
