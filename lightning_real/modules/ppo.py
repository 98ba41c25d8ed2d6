"""PPO with an actor, a critic, a reference and a reward (model or rule), each call on its own layout.

One iteration is the graph of :func:`lightning_real.graphs.ppo.ppo_graph`: ``actor_gen`` samples
responses, ``ref_inf``, ``rew_inf`` and ``critic_inf`` score them, ``actor_train`` and
``critic_train`` take PPO steps. Both train calls gather the global batch over their
data-parallel group and compute the same experience from it (KL-shaped rewards, GAE, whitened
advantages), so the update does not depend on the layouts; each then steps on its replica's
share of every minibatch.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.algorithms.aggregation import agg_norm_key
from lightning_real.algorithms.masked import RunningMeanStd
from lightning_real.algorithms.policy import PolicyLossConfig
from lightning_real.algorithms.ppo import (
    PPOConfig,
    critic_loss,
    explained_variance,
    kl_controller,
    ppo_experience,
)
from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PROMPT_INDEX_KEY
from lightning_real.graphs.ppo import ppo_graph
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
    value_call,
)
from lightning_real.modules.rollout import RewardSource, RolloutModule
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import Training


class PPOModule(RolloutModule):
    """PPO for language models, run by :class:`~lightning_real.strategy.RealStrategy`.

    Args:
        actor: HF checkpoint folder or ModelSpec (random init) of the policy.
        critic: value model; None builds it from the actor's source with a value head (zero
            initialised when the actor is a causal-LM folder).
        reward: a reward model (HF folder or ModelSpec with a value head; its score is the value
            at the last token), or a rule ``(seq, attention_mask, loss_mask) -> [B]``; None uses
            the shipped task's rule (:class:`lightning_real.data.task.TaskReward`).
        ref: reference model for the KL penalty; None uses the actor's source (frozen).
        batch_size: prompts (= sequences) per iteration; the data module's batch size.
        generation: sampling settings; EOS and pad default to the tokenizer's.
        ppo: PPO hyper-parameters.
        actor_optim, critic_optim: AdamW settings of the two trained models.
        n_mbs: microbatches per data-parallel replica, one count or per call (a plan's
            microbatches take precedence).
        tokenizer: tokenizer folder (None: the byte tokenizer the shipped task uses).
        seed: seed of random inits and of sampling.
        prompt_len: prompt tokens per sequence, as the planner prices the calls.
        val_reward, val_at_start: as :class:`~lightning_real.modules.rollout.RolloutModule`.
    """

    roles: ClassVar[tuple[str, ...]] = ("actor", "critic", "ref", "reward")

    def __init__(
        self,
        actor: ModelSource,
        critic: ModelSource | None = None,
        reward: RewardSource | None = None,
        ref: ModelSource | None = None,
        *,
        batch_size: int = 8,
        generation: GenerationConfig | None = None,
        ppo: PPOConfig | None = None,
        actor_optim: OptimConfig | None = None,
        critic_optim: OptimConfig | None = None,
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
            critic,
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
        """The actor loss (its aggregation is also the critic's)."""
        self.actor_optim = actor_optim or OptimConfig(lr=1e-5)
        self.critic_optim = critic_optim or OptimConfig(lr=1e-5)
        self.controllers: dict[str, Any] = {}
        self.normalizers: dict[str, RunningMeanStd] = {}

    # ---- what runs -------------------------------------------------------------------------------
    def real_graph(self) -> DataflowGraph:
        return ppo_graph(
            self.batch_size,
            self.n_mbs,
            minibatches=self.ppo.minibatches,
            prompt_len=self.prompt_len,
            gen_len=self.generation.max_new_tokens,
            with_index=self.reward_needs_index,
        )

    def role_training(self, role: str) -> Training | None:
        norm = agg_norm_key(self.ppo.loss_agg)
        if role == "actor":
            return Training(self._actor_loss, self.actor_optim, norm_key=norm, packable=self.policy.packable)
        if role == "critic":
            return Training(
                self._critic_loss, self.critic_optim, norm_key=norm, packable=self.policy.packable
            )
        return None

    # ---- the calls on every rank ------------------------------------------------------------------
    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:
        budget = ctx.features.token_budget
        self.controllers = {c: kl_controller(self.ppo) for c in ("actor_train", "critic_train")}
        self.normalizers = {c: RunningMeanStd() for c in ("actor_train", "critic_train")}
        fns = {
            "actor_gen": generate_call(
                ctx.generator("actor_gen"),
                self.generation,
                self.seed_of_step,
                with_index=self.reward_needs_index,
            ),
            "ref_inf": logprob_call(ctx.microbatches("ref_inf"), budget),
            "rew_inf": reward_call(
                self.reward_rule,
                ctx.microbatches("rew_inf"),
                index_key=PROMPT_INDEX_KEY if self.reward_needs_index else None,
                token_budget=budget,
            ),
            "critic_inf": value_call(ctx.microbatches("critic_inf"), budget),
            "actor_train": self._train_call("actor_train", "actor"),
            "critic_train": self._train_call("critic_train", "critic"),
        }
        return fns

    # ---- losses (called by the training engine on each microbatch) --------------------------------
    def _actor_loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return policy_step_loss(out, mb, self.policy, self.engines["actor"].tp_group)

    def _critic_loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        values = out.squeeze(-1).float()[:, :-1]
        return critic_loss(
            values,
            mb["old_values"],
            mb["returns"],
            mb["action_mask"],
            self.ppo,
            reduction="sum",
            gen_len=self.generation.max_new_tokens,
        )

    # ---- train calls -------------------------------------------------------------------------------
    def _train_call(self, call: str, role: str) -> CallFn:
        def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
            assert shard is not None
            g = shard.groups
            full = gather_rows(x, g.dp, g.layout.dp)
            exp, mask = self._experience(call, full)
            rows = train_rows(full)
            if role == "actor":
                rows.update(old_logp=full["old_logp"], advantages=exp.advantages)
                if self.policy.use_kl_loss:
                    rows["ref_logp"] = full["ref_logp"]
            else:
                rows.update(old_values=exp.values, returns=exp.returns)
            metrics = train_steps(
                self.engines[role], rows, g, self.ppo.minibatches, self.ppo.ppo_epochs, role
            )
            metrics.update(exp.metrics)
            if role == "critic":
                metrics["critic/vf_explained_var"] = explained_variance(exp.values, exp.returns, mask)
            metrics["perf/tokens"] = float(full["attention_mask"].sum())
            return {}, metrics

        return fn

    def _experience(self, call: str, full: Rows) -> tuple[Any, torch.Tensor]:
        """PPO experience of the global batch; updates the call's KL controller and score statistics."""
        mask = full["loss_mask"][:, 1:]
        ctrl = self.controllers[call]
        exp = ppo_experience(
            full["rewards"],
            full["values"],
            full["old_logp"],
            full["ref_logp"],
            mask,
            full["no_eos"],
            self.ppo,
            kl_coef=ctrl.value,
            normalizer=self.normalizers[call],
        )
        ctrl.update(exp.metrics["actor/ref_kl"], n_steps=int(mask.shape[0]))
        return exp, mask

    # ---- checkpoints --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "kl": {c: k.value for c, k in self.controllers.items()},
            "normalizers": {c: n.state_dict() for c, n in self.normalizers.items()},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for c, v in state.get("kl", {}).items():
            self.controllers[c].value = float(v)
        for c, s in state.get("normalizers", {}).items():
            self.normalizers[c].load_state_dict(s)
