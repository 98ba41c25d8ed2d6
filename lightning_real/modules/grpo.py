"""GRPO: ``group_size`` responses per prompt, group-relative advantages, no critic.

The graph is :func:`lightning_real.graphs.grpo.grpo_graph` (``actor_gen``, ``ref_inf`` when the KL
weight is not 0, ``rew_inf``, ``actor_train``). ``actor_train`` gathers the global batch over
its data-parallel group so every group's baseline sees all of its responses, whatever the
layout, then steps on its replica's share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.algorithms.grpo import GRPOConfig, group_advantages, grpo_loss, grpo_metrics
from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.grpo import grpo_graph
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.source import ModelSource
from lightning_real.modules.calls import (
    Rows,
    gather_rows,
    generate_call,
    logprob_call,
    reward_call,
    train_rows,
    train_steps,
)
from lightning_real.modules.rollout import RewardSource, RolloutModule
from lightning_real.runtime.build import CallFn, RuntimeContext
from lightning_real.runtime.roles import Training


class GRPOModule(RolloutModule):
    """GRPO (DeepSeekMath), run by :class:`~lightning_real.strategy.RealStrategy`.

    Args:
        actor, reward, ref: as :class:`~lightning_real.modules.ppo.PPOModule` (no critic).
        batch_size: prompts per iteration (the data module's batch size); the iteration trains
            on ``batch_size * group_size`` sequences.
        group_size: responses per prompt; overrides ``grpo.group_size`` when given.
        generation: sampling settings (EOS and pad default to the tokenizer's).
        grpo: GRPO hyper-parameters.
        actor_optim: AdamW settings.
        n_mbs, tokenizer, seed, prompt_len: as PPOModule.
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
        )
        cfg = grpo or GRPOConfig()
        self.grpo = cfg if group_size is None else replace(cfg, group_size=group_size)
        self.actor_optim = actor_optim or OptimConfig(lr=1e-5)

    @property
    def use_ref(self) -> bool:
        """Whether the graph has a reference call (a KL weight of 0 drops it)."""
        return self.grpo.kl_coef > 0

    def real_graph(self) -> DataflowGraph:
        return grpo_graph(
            self.batch_size * self.grpo.group_size,
            self.grpo.group_size,
            self.n_mbs,
            minibatches=self.grpo.minibatches,
            use_ref=self.use_ref,
            prompt_len=self.prompt_len,
            gen_len=self.generation.max_new_tokens,
        )

    def role_training(self, role: str) -> Training | None:
        if role != "actor":
            return None
        # 'seq-mean-token-mean' sums per-sequence means: normalise by the number of sequences.
        norm = "action_mask" if self.grpo.loss_agg == "token-mean" else None
        return Training(self._loss, self.actor_optim, norm_key=norm, packable=norm is not None)

    def real_calls(self, ctx: RuntimeContext) -> dict[str, CallFn]:

        fns = {
            "actor_gen": generate_call(
                ctx.generator("actor_gen"),
                self.generation,
                self.seed_of_step,
                group_size=self.grpo.group_size,
            ),
            "rew_inf": reward_call(self.reward_rule, ctx.microbatches("rew_inf")),
            "actor_train": self._train,
        }
        if self.use_ref:
            fns["ref_inf"] = logprob_call(ctx.microbatches("ref_inf"))
        return fns

    def _loss(self, out: torch.Tensor, mb: Rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from lightning_real.models.vocab_parallel import vocab_parallel_logprobs

        logp = vocab_parallel_logprobs(out[:, :-1], mb["input_ids"][:, 1:], self.engines["actor"].tp_group)
        ref = mb.get("ref_logp")
        return grpo_loss(logp, mb["old_logp"], ref, mb["advantages"], mb["action_mask"], self.grpo, "sum")

    def _train(self, shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None
        g = shard.groups
        full = gather_rows(x, g.dp, g.layout.dp)
        mask = full["loss_mask"][:, 1:]
        adv = group_advantages(full["rewards"], self.grpo.group_size, self.grpo.scale_by_std, self.grpo.eps)
        rows = {**train_rows(full), "old_logp": full["old_logp"], "advantages": adv}
        if "ref_logp" in full:
            rows["ref_logp"] = full["ref_logp"]
        metrics = train_steps(self.engines["actor"], rows, g, self.grpo.minibatches, 1, "actor")
        metrics.update(grpo_metrics(full["rewards"], self.grpo.group_size, mask))
        metrics["perf/tokens"] = float(full["attention_mask"].sum())
        return {}, metrics
