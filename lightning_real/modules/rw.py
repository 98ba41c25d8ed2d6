"""Reward-model training on preference pairs through RealStrategy (the ``rw`` graph).

A value-head model scores each answer by its head's output at the answer's last token and trains
on the Bradley-Terry loss ``-log sigmoid(r_chosen - r_rejected)``. Pairs travel as one packed row
each, as in :mod:`lightning_real.modules.dpo`, so both scores of a pair are in one microbatch.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import ModelSpec
from lightning_real.module import ModelSource, RealContext, RLHFModule, load_home, spec_of
from lightning_real.modules.dpo import pack_pairs

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

    def real_graph(self) -> Any:
        from lightning_real.dataflow import rw_graph

        return rw_graph(self.batch_size, self.n_mbs)

    def real_specs(self) -> dict[str, ModelSpec]:
        return {"reward": self.spec}

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        from lightning_real.dataflow import PAIR_SOURCES

        return {k: batch[k] for k in PAIR_SOURCES}

    def real_setup(self, strategy: Any) -> RealContext:
        from lightning_real.algorithms.rw import last_token_scores, pairwise_loss
        from lightning_real.models.train import TrainConfig, TrainEngine
        from lightning_real.realloc import Reallocator
        from lightning_real.runtime.pool import ModelPool, PooledModel

        groups = strategy.registry.for_layout(strategy.plan["rew_train"])
        home = load_home(self.source, self.spec, groups, self.seed, init_value_head=True)

        def loss_fn(out: torch.Tensor, mb: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            values = out.squeeze(-1).float()  # [b, 2S]: the value head on every tp rank
            s = mb["chosen_attention_mask"].shape[1]
            chosen = last_token_scores(values[:, :s], mb["chosen_attention_mask"])
            rejected = last_token_scores(values[:, s:], mb["rejected_attention_mask"])
            loss, m = pairwise_loss(chosen, rejected, reduction="sum")
            return loss, {"rw/" + k.split("/", 1)[1]: v for k, v in m.items()}

        # norm_key None: the summed loss and metrics are divided by the number of pairs (rows).
        n_mbs = strategy.microbatches["rew_train"]  # the plan's, else the graph's
        cfg = TrainConfig(n_mbs=n_mbs, norm_key=None, optim=self.optim)
        self.engine = TrainEngine(home, loss_fn, cfg)
        self.pool = ModelPool()
        self.pool.add(PooledModel("reward", home, Reallocator(self.spec, strategy.registry)))

        def rew_train(shard: Any, x: Batch) -> tuple[Batch, dict[str, float]]:
            batch = {
                **pack_pairs(x),
                "chosen_attention_mask": x["chosen_attention_mask"],
                "rejected_attention_mask": x["rejected_attention_mask"],
            }
            m = self.engine.step(batch)
            metrics = {k: v for k, v in m.items() if k.startswith("rw/")}
            metrics.update({"rw/grad_norm": m["grad_norm"], "rw/lr": m["lr"]})
            return {}, metrics

        return RealContext({"rew_train": rew_train}, self.pool.move, self.pool.release)

    def real_state_dict(self) -> dict[str, Any]:
        return {"reward": self.shard_state_dict("reward"), "reward_optim": self.engine.state_dict()}

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        self.load_shard_state_dict("reward", state["reward"])
        self.engine.load_state_dict(state["reward_optim"])
