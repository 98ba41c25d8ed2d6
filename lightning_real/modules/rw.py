"""Reward-model training on preference pairs through RealStrategy (the ``rw`` graph).

A value-head model scores each answer by its head's output at the answer's last token and trains
on the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``. Pairs travel as one packed row
each, as in :mod:`lightning_real.modules.dpo`, so both scores of a pair are in one microbatch.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PAIR_SOURCES
from lightning_real.graphs.rw import rw_graph
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource, spec_of
from lightning_real.module import RLHFModule
from lightning_real.modules.dpo import pack_pairs
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import RoleDecl, Training

Batch = dict[str, torch.Tensor]


class RewardModelModule(RLHFModule):
    """Trains a reward model (``rew_train`` on the reward role) from preference pairs.

    Metrics: ``rw/loss``, ``rw/accuracy`` (share of pairs scored the right way round),
    ``rw/margin``, ``rw/chosen_reward``, ``rw/rejected_reward``, ``rw/grad_norm``, ``rw/lr``.
    Export with ``save_hf("reward", folder)`` (the family's ``*ForSequenceClassification``).

    Args:
        model: HF checkpoint folder or ModelSpec (random init). A causal-LM folder (e.g. the SFT
            model) gets a value head initialised at zero; a folder with a ``score`` head keeps it.
        batch_size: preference pairs per step (the data module's batch size).
        optim: AdamW settings.
        n_mbs: microbatches per data-parallel replica.
        seed: seed of a random init.
    """

    progress_bar_keys = ("rw/loss", "rw/accuracy")

    def __init__(
        self,
        model: ModelSource,
        *,
        batch_size: int,
        optim: OptimConfig | None = None,
        n_mbs: int = 1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.source = model
        self.batch_size = batch_size
        self.optim = optim or OptimConfig(lr=1e-5)
        self.n_mbs = n_mbs
        self.seed = seed
        self.spec = spec_of(model, "value")
        self.real_graph()  # checks batch_size and n_mbs now rather than at setup

    def real_graph(self) -> DataflowGraph:
        return rw_graph(self.batch_size, self.n_mbs)

    def real_roles(self) -> tuple[RoleDecl, ...]:
        # norm_key None: the summed loss and metrics are divided by the number of pairs (rows).
        # Each row already holds a pair as two segments: rows are not packed further.
        training = Training(self._loss, self.optim, norm_key=None, packable=False)
        return (
            RoleDecl("reward", self.source, self.spec, self.seed, init_value_head=True, training=training),
        )

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in PAIR_SOURCES}

    def _loss(self, out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from lightning_real.algorithms.rw import last_token_scores, pairwise_loss

        values = out.squeeze(-1).float()  # [b, 2S]: the value head on every tp rank
        s = mb["chosen_attention_mask"].shape[1]
        chosen = last_token_scores(values[:, :s], mb["chosen_attention_mask"])
        rejected = last_token_scores(values[:, s:], mb["rejected_attention_mask"])
        loss, m = pairwise_loss(chosen, rejected, reduction="sum")
        return loss, {"rw/" + k.split("/", 1)[1]: v for k, v in m.items()}

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        engine = ctx.engine("reward")

        def rew_train(shard: ModelShard | None, x: Batch) -> tuple[Batch, dict[str, float]]:
            batch = {
                **pack_pairs(x),
                "chosen_attention_mask": x["chosen_attention_mask"],
                "rejected_attention_mask": x["rejected_attention_mask"],
            }
            m = engine.step(batch)
            metrics = {k: v for k, v in m.items() if k.startswith("rw/")}
            metrics.update({"rw/grad_norm": m["grad_norm"], "rw/lr": m["lr"]})
            return {}, metrics

        return {"rew_train": rew_train}
