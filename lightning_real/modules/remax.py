"""ReMax: REINFORCE with the reward of the greedy response as the baseline; no critic.

The graph is :func:`lightning_real.dataflow.remax_graph`: ``actor_gen`` samples and
``actor_gen_greedy`` decodes greedily from the same prompts, ``rew_inf`` and
``rew_inf_greedy`` score both, ``ref_inf`` (when the KL weight is not 0) scores the sampled
responses, and ``actor_train`` takes one on-policy step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.algorithms.remax import remax_advantages
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.module import ModelSource, RealContext
from lightning_real.modules.calls import (
    Rows,
    gather_rows,
    generate_call,
    logprob_call,
    policy_step_loss,
    reward_call,
    train_rows,
    train_steps,
)
from lightning_real.modules.rollout import RewardSource, RolloutModule

GREEDY_KEYS = ("greedy_seq", "greedy_attention_mask", "greedy_loss_mask")


class ReMaxModule(RolloutModule):
    """ReMax (Li et al., 2023), run by :class:`~lightning_real.strategy.RealStrategy`.

    Args:
        actor, reward, ref: as :class:`~lightning_real.modules.ppo.PPOModule` (no critic).
        batch_size: prompts per iteration (the data module's batch size).
        generation: sampling settings (EOS and pad default to the tokenizer's).
        ppo: the KL weight and estimator (``kl_coef``, ``kl_estimator``) and the policy-loss
            settings (``clip_eps``, ``entropy_coef``); GAE and critic settings are unused.
        actor_optim: AdamW settings.
        n_mbs, tokenizer, seed: as PPOModule.
    """

    homes: ClassVar[dict[str, str]] = {"actor": "actor_train", "ref": "ref_inf", "reward": "rew_inf"}

    def __init__(
        self,
        actor: ModelSource,
        reward: RewardSource | None = None,
        ref: ModelSource | None = None,
        *,
        batch_size: int = 8,
        generation: GenerationConfig | None = None,
        ppo: PPOConfig | None = None,
        actor_optim: OptimConfig | None = None,
        n_mbs: int | Mapping[str, int] = 1,
        tokenizer: str | Path | Any | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            actor,
            reward,
            ref,
            batch_size=batch_size,
            generation=generation,
            n_mbs=n_mbs,
            tokenizer=tokenizer,
            seed=seed,
        )
        self.ppo = ppo or PPOConfig()
        self.actor_optim = actor_optim or OptimConfig(lr=1e-5)

    @property
    def use_ref(self) -> bool:
        """Whether the graph has a reference call (a KL weight of 0 drops it)."""
        return self.ppo.kl_coef > 0

    def real_graph(self) -> Any:
        from lightning_real.dataflow import remax_graph

        return remax_graph(
            self.batch_size, self.n_mbs, use_ref=self.use_ref, gen_len=self.generation.max_new_tokens
        )

    def real_setup(self, strategy: Any) -> RealContext:
        mbs = strategy.microbatches
        self.build_pool(strategy)
        self.build_engine("actor", self._loss, self.actor_optim, mbs["actor_train"])

        fns = {
            "actor_gen": generate_call(self.generation, self.seed_of_step),
            "actor_gen_greedy": generate_call(
                self.generation, self.seed_of_step, greedy=True, out_prefix="greedy_", keys=GREEDY_KEYS
            ),
            "rew_inf": reward_call(self.reward_rule, mbs["rew_inf"]),
            "rew_inf_greedy": reward_call(
                self.reward_rule, mbs["rew_inf_greedy"], in_prefix="greedy_", out_key="greedy_rewards"
            ),
            "actor_train": self._train,
        }
        if self.use_ref:
            fns["ref_inf"] = logprob_call(mbs["ref_inf"])
        return RealContext(fns, self.pool.move, self.pool.release)

    def _loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_step_loss(out, mb, self.ppo, self.engines["actor"].tp_group)

    def _train(self, shard: ModelShard, x: Rows) -> tuple[Rows, dict[str, float]]:
        g = shard.groups
        full = gather_rows(x, g.dp, g.layout.dp)
        mask = full["loss_mask"][:, 1:]
        ref = full.get("ref_logp")
        adv, metrics = remax_advantages(
            full["rewards"],
            full["greedy_rewards"],
            mask,
            full["old_logp"] if ref is not None else None,
            ref,
            self.ppo.kl_coef,
            self.ppo.kl_estimator,
        )
        rows = {**train_rows(full), "old_logp": full["old_logp"], "advantages": adv}
        metrics.update(train_steps(self.engines["actor"], rows, g, 1, 1, "actor"))
        metrics["perf/tokens"] = float(full["attention_mask"].sum())
        return {}, metrics
