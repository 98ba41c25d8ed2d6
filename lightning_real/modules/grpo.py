"""GRPO and the algorithms on its graph: ``group_size`` responses per prompt, no critic.

The graph is :func:`lightning_real.graphs.grpo.grpo_graph` (``actor_gen``, ``ref_inf`` when a KL
term is on, ``rew_inf``, ``actor_inf`` for truncated importance sampling, ``actor_train``).
:class:`~lightning_real.algorithms.grpo.GRPOConfig` picks the advantage estimator (GRPO, pass@k,
RLOO, REINFORCE++ and its baseline variant), the policy loss (PPO's clip, clip-higher, dual
clip, GSPO), the aggregation, the KL loss or reward penalty, and DAPO's dynamic sampling and
overlong shaping; :data:`~lightning_real.algorithms.grpo.PRESETS` names the published settings.
``actor_train`` gathers the global batch over its data-parallel group so every group's baseline
and every batch statistic sees all of its responses, whatever the layout, then steps on its
replica's share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.algorithms.advantages import compute_advantages
from lightning_real.algorithms.aggregation import agg_norm_key
from lightning_real.algorithms.dapo import overlong_penalty
from lightning_real.algorithms.grpo import GRPOConfig, grpo_metrics
from lightning_real.algorithms.masked import masked_sum
from lightning_real.algorithms.ppo import kl_per_token
from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PROMPT_INDEX_KEY
from lightning_real.graphs.grpo import ACTOR_LOGP_KEY, KEPT_KEY, grpo_graph
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
from lightning_real.modules.dynamic import dynamic_generate_call
from lightning_real.modules.rollout import RewardSource, RolloutModule
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import Training


class GRPOModule(RolloutModule):
    """GRPO (DeepSeekMath) and its family, run by :class:`~lightning_real.strategy.RealStrategy`.

    Args:
        actor, reward, ref: as :class:`~lightning_real.modules.ppo.PPOModule` (no critic).
        batch_size: prompts per iteration; the iteration trains on ``batch_size * group_size``
            sequences. Under dynamic sampling the data module gives ``batch_size *
            grpo.max_gen_rounds`` prompts (:attr:`prompts_per_step`), one batch per round.
        group_size: responses per prompt; overrides ``grpo.group_size`` when given.
        generation: sampling settings (EOS and pad default to the tokenizer's).
        grpo: the algorithm's settings (``GRPOConfig.preset("rloo")`` and so on).
        actor_optim: AdamW settings.
        n_mbs, tokenizer, seed, prompt_len, val_reward, val_at_start: as
            :class:`~lightning_real.modules.rollout.RolloutModule`.
    """

    roles: ClassVar[tuple[str, ...]] = ("actor", "ref", "reward")

    def __init__(
        self,
        actor: ModelSource,
        reward: RewardSource | None = None,
        ref: ModelSource | None = None,
        *,
        batch_size: int = 8,
        group_size: int | None = None,
        generation: GenerationConfig | None = None,
        grpo: GRPOConfig | None = None,
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
        cfg = grpo or GRPOConfig()
        self.grpo = cfg if group_size is None else replace(cfg, group_size=group_size)
        gen_len = self.generation.max_new_tokens
        self.policy = self.grpo.policy_config(gen_len)
        """The actor loss (checked now: a bad combination fails before any process starts)."""
        self.dapo = self.grpo.dapo_config(gen_len)
        """Dynamic sampling and overlong shaping."""
        if self.dapo.dynamic_sampling and self.reward_rule is None:
            raise ValueError(
                "GRPOConfig.dynamic_sampling=True scores every generation round inside actor_gen, which "
                "needs a rule reward (a callable, reward.rule or reward.fn), not a reward model"
            )
        self.actor_optim = actor_optim or OptimConfig(lr=1e-5)

    @property
    def use_ref(self) -> bool:
        """Whether the graph has a reference call (no KL loss and no KL penalty drop it)."""
        return self.grpo.use_ref

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size * self.grpo.prompt_rounds

    def _prompts_reason(self) -> str:
        return f"batch_size={self.batch_size} x grpo.max_gen_rounds={self.grpo.max_gen_rounds} for dynamic sampling"

    def real_graph(self) -> DataflowGraph:
        return grpo_graph(
            self.batch_size * self.grpo.group_size,
            self.grpo.group_size,
            self.n_mbs,
            minibatches=self.grpo.minibatches,
            use_ref=self.use_ref,
            prompt_len=self.prompt_len,
            gen_len=self.generation.max_new_tokens,
            with_index=self.reward_needs_index,
            actor_logp=self.policy.tis_cap is not None,
            dynamic_sampling=self.dapo.dynamic_sampling,
        )

    def role_training(self, role: str) -> Training | None:
        if role != "actor":
            return None
        # token-mean divides by the global token count, the sequence modes by the row count; a
        # per-sequence mean (seq-mean-token-mean, GSPO's sequence ratio) does not survive packing
        norm = agg_norm_key(self.policy.loss_agg)
        return Training(self._loss, self.actor_optim, norm_key=norm, packable=self.policy.packable)

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        g = self.grpo
        index_key = PROMPT_INDEX_KEY if self.reward_needs_index else None
        if self.dapo.dynamic_sampling:
            assert self.reward_rule is not None
            gen = dynamic_generate_call(
                ctx.generator("actor_gen"),
                self.generation,
                self.seed_of_step,
                g.group_size,
                self.batch_size,
                g.max_gen_rounds,
                self.reward_rule,
                with_index=self.reward_needs_index,
            )
        else:
            gen = generate_call(
                ctx.generator("actor_gen"),
                self.generation,
                self.seed_of_step,
                group_size=g.group_size,
                with_index=self.reward_needs_index,
            )
        budget = ctx.features.token_budget
        fns = {"actor_gen": gen, "actor_train": self._train}
        if not self.dapo.dynamic_sampling:
            fns["rew_inf"] = reward_call(
                self.reward_rule, ctx.microbatches("rew_inf"), index_key=index_key, token_budget=budget
            )
        if self.use_ref:
            fns["ref_inf"] = logprob_call(ctx.microbatches("ref_inf"), budget)
        if self.policy.tis_cap is not None:
            fns["actor_inf"] = logprob_call(ctx.microbatches("actor_inf"), budget, out_key=ACTOR_LOGP_KEY)
        return fns

    def _loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, metrics = policy_step_loss(out, mb, self.policy, self.engines["actor"].tp_group)
        if "actor/kl_loss" not in metrics:
            metrics["actor/kl_loss"] = torch.zeros_like(loss.detach())
        return loss, metrics

    def shaped_scores(self, rewards: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
        """The scores the advantages see: the rewards plus DAPO's overlong penalty (when on)."""
        d = self.dapo
        if d.overlong_max_len is None:
            return rewards.float()
        lengths = loss_mask.sum(-1)
        return rewards.float() + overlong_penalty(
            lengths, d.overlong_max_len, d.overlong_cache, d.overlong_factor
        )

    def _train(self, shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None
        g, cfg = shard.groups, self.grpo
        full = gather_rows(x, g.dp, g.layout.dp)
        response = full["loss_mask"][:, 1:].float()
        mask = response
        if KEPT_KEY in full:  # filler groups of dynamic sampling take no part in the update
            mask = response * full[KEPT_KEY].unsqueeze(-1).to(response.dtype)
        # TIS: the training actor's log-probs are the old policy, the engine's the rollout's
        old = full[ACTOR_LOGP_KEY] if ACTOR_LOGP_KEY in full else full["old_logp"]
        ref = full.get("ref_logp")
        scores = self.shaped_scores(full["rewards"], full["loss_mask"])
        adv, _ = compute_advantages(cfg.advantage_config(), scores, mask, logp=old, ref_logp=ref)
        rows = {**train_rows(full), "action_mask": mask, "old_logp": old, "advantages": adv}
        if self.policy.use_kl_loss:
            assert ref is not None
            rows["ref_logp"] = ref
        if self.policy.tis_cap is not None:
            rows["rollout_logp"] = full["old_logp"]
        metrics = train_steps(self.engines["actor"], rows, g, cfg.minibatches, 1, "actor")
        metrics.update(grpo_metrics(full["rewards"], cfg.group_size, response))
        if self.dapo.overlong_max_len is not None:
            metrics["reward/overlong_penalty"] = float((scores - full["rewards"].float()).mean())
        if cfg.reward_kl_coef and ref is not None:
            kl = masked_sum(kl_per_token(old, ref, cfg.reward_kl_estimator), mask, dim=-1)
            metrics["actor/ref_kl"] = float(kl.mean())
        metrics["perf/tokens"] = float(full["attention_mask"].sum())
        return {}, metrics
