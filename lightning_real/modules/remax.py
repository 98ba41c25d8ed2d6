"""ReMax: REINFORCE with the reward of the greedy response as the baseline; no critic.

The graph is :func:`lightning_real.graphs.remax.remax_graph`: ``actor_gen`` samples and
``actor_gen_greedy`` decodes greedily from the same prompts, ``rew_inf`` and
``rew_inf_greedy`` score both, ``ref_inf`` (when the KL weight is not 0) scores the sampled
responses, and ``actor_train`` takes one on-policy step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.algorithms.aggregation import agg_norm_key
from lightning_real.algorithms.policy import PolicyLossConfig
from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.algorithms.remax import remax_advantages
from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PROMPT_INDEX_KEY
from lightning_real.graphs.remax import GREEDY_KEYS, remax_graph
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource
from lightning_real.modules.calls import (
    Rows,
    Rule,
    gather_rows,
    generate_call,
    logprob_call,
    policy_step_loss,
    reward_call,
    train_rows,
    train_steps,
)
from lightning_real.modules.rollout import RewardSource, RolloutModule
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import Training


class ReMaxModule(RolloutModule):
    """ReMax (Li et al., 2023), run by :class:`~lightning_real.strategy.RealStrategy`.

    Args:
        actor, reward, ref: as :class:`~lightning_real.modules.ppo.PPOModule` (no critic).
        batch_size: prompts per iteration (the data module's batch size).
        generation: sampling settings (EOS and pad default to the tokenizer's).
        ppo: the KL weight and estimator (``kl_coef``, ``kl_estimator``) and the policy-loss
            settings (``clip_eps``, ``entropy_coef``, ``loss_agg``, the KL loss); GAE and critic
            settings are unused.
        actor_optim: AdamW settings.
        n_mbs, tokenizer, seed, prompt_len, val_reward, val_at_start: as PPOModule.
    """

    roles: ClassVar[tuple[str, ...]] = ("actor", "ref", "reward")

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
        prompt_len: int = 128,
        val_reward: Rule | None = None,
        val_at_start: bool = False,
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
            prompt_len=prompt_len,
            val_reward=val_reward,
            val_at_start=val_at_start,
        )
        self.ppo = ppo or PPOConfig()
        self.policy = PolicyLossConfig.from_ppo(self.ppo, self.generation.max_new_tokens)
        """The actor loss."""
        self.actor_optim = actor_optim or OptimConfig(lr=1e-5)

    @property
    def use_ref(self) -> bool:
        """Whether the graph has a reference call (no KL penalty and no KL loss drop it)."""
        return self.ppo.kl_coef > 0 or self.ppo.use_kl_loss

    def real_graph(self) -> DataflowGraph:
        return remax_graph(
            self.batch_size,
            self.n_mbs,
            use_ref=self.use_ref,
            prompt_len=self.prompt_len,
            gen_len=self.generation.max_new_tokens,
            with_index=self.reward_needs_index,
        )

    def role_training(self, role: str) -> Training | None:
        if role != "actor":
            return None
        norm = agg_norm_key(self.ppo.loss_agg)
        return Training(self._loss, self.actor_optim, norm_key=norm, packable=self.policy.packable)

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        index_key = PROMPT_INDEX_KEY if self.reward_needs_index else None
        fns = {
            "actor_gen": generate_call(
                ctx.generator("actor_gen"),
                self.generation,
                self.seed_of_step,
                with_index=self.reward_needs_index,
            ),
            "actor_gen_greedy": generate_call(
                ctx.generator("actor_gen_greedy"),
                self.generation,
                self.seed_of_step,
                greedy=True,
                out_prefix="greedy_",
                keys=GREEDY_KEYS,
            ),
            "rew_inf": reward_call(self.reward_rule, ctx.microbatches("rew_inf"), index_key=index_key),
            "rew_inf_greedy": reward_call(
                self.reward_rule,
                ctx.microbatches("rew_inf_greedy"),
                in_prefix="greedy_",
                out_key="greedy_rewards",
                index_key=index_key,
            ),
            "actor_train": self._train,
        }
        if self.use_ref:
            fns["ref_inf"] = logprob_call(ctx.microbatches("ref_inf"))
        return fns

    def _loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_step_loss(out, mb, self.policy, self.engines["actor"].tp_group)

    def _train(self, shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None
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
        if self.policy.use_kl_loss:
            assert ref is not None
            rows["ref_logp"] = ref
        metrics.update(train_steps(self.engines["actor"], rows, g, 1, 1, "actor"))
        metrics["perf/tokens"] = float(full["attention_mask"].sum())
        return {}, metrics
