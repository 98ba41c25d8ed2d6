"""Base of the modules that sample from the actor (PPO, GRPO and its family, ReMax).

It owns what they share: the tokenizer and sampling defaults, the model sources by role (a
reward may be a rule instead of a model, and a rule may read each row's ground truth through the
prompts' row numbers), the declaration of each role's model (built by the runtime on the layout
of its home call, trained roles with an engine), the prompt source keys, the per-iteration
sampling seed, and the validation step: greedy responses to held-out prompts, scored
(:mod:`lightning_real.modules.evaluation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from typing_extensions import override

from lightning_real.models.generate import GenerationConfig
from lightning_real.models.source import ModelSource, spec_of
from lightning_real.models.spec import ModelSpec
from lightning_real.module import RLHFModule
from lightning_real.modules.calls import Rule, needs_index
from lightning_real.modules.evaluation import EvalSums, evaluate_prompts
from lightning_real.runtime.roles import RoleDecl, Training

RewardSource = ModelSource | Rule
"""A reward model (HF folder or ModelSpec, value head) or a rule ``(seq, attention_mask, loss_mask) -> [B]``
(one that reads each row's prompt row number, as
:class:`~lightning_real.data.verifiable.VerifiableReward`, takes ``prompt_index`` too)."""


def generation_defaults(config: GenerationConfig | None, tokenizer: Any) -> GenerationConfig:
    """``config`` with the tokenizer's EOS and pad ids where it leaves them unset."""
    cfg = config or GenerationConfig()
    if cfg.eos_token_id is None:
        cfg = replace(cfg, eos_token_id=int(tokenizer.eos_token_id))
    if cfg.pad_token_id == 0 and tokenizer.pad_token_id is not None:
        cfg = replace(cfg, pad_token_id=int(tokenizer.pad_token_id))
    return cfg


def step_seed(seed: int, iteration: int) -> int:
    """Sampling seed of one iteration: fixed by the run's seed and the step, so a resumed run
    samples what the uninterrupted one would."""
    return (seed * 1_000_003 + iteration * 7_919 + 1) % (2**62)


class RolloutModule(RLHFModule):
    """Shared set-up of the generating algorithms; subclasses declare :attr:`roles`, the graph,
    the calls and each trained role's :meth:`role_training`.

    Args:
        actor: HF checkpoint folder or ModelSpec of the policy.
        reward: reward model or rule; None uses the shipped task's rule
            (:class:`lightning_real.data.task.TaskReward`).
        ref: reference model; None uses the actor's source (frozen). Ignored when the
            algorithm runs no reference call.
        critic: value model (PPO only); None builds it from the actor's source with a value head.
        batch_size: prompts per iteration (the data module's batch size).
        generation: sampling settings; EOS and pad default to the tokenizer's.
        n_mbs: microbatches per data-parallel replica, one count or per call.
        tokenizer: tokenizer folder (None: the byte tokenizer of the shipped task).
        seed: seed of random inits and of sampling.
        prompt_len: prompt tokens per sequence, as the planner prices the calls (the data
            module's ``max_prompt_len``).
        val_reward: the rule that scores validation rows (a VerifiableReward holds the answers of
            one file, so the held-out file needs its own); None: the training reward.
        val_at_start: also evaluate the validation rows before the first step (logged at step 0).
    """

    roles: ClassVar[tuple[str, ...]] = ()
    """Model roles in the order every rank builds them (a role's random init seed follows it)."""

    def __init__(
        self,
        actor: ModelSource,
        reward: RewardSource | None = None,
        ref: ModelSource | None = None,
        critic: ModelSource | None = None,
        *,
        batch_size: int = 8,
        generation: GenerationConfig | None = None,
        n_mbs: int | Mapping[str, int] = 1,
        tokenizer: str | Path | Any | None = None,
        seed: int = 0,
        prompt_len: int = 128,
        val_reward: Rule | None = None,
        val_at_start: bool = False,
    ) -> None:
        super().__init__()
        from lightning_real.data.tokenizer import load_tokenizer

        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"{type(self).__name__} batch_size={batch_size!r}; allowed: an integer >= 1")
        self.tokenizer = load_tokenizer(tokenizer)
        self.batch_size = batch_size
        self.generation = generation_defaults(generation, self.tokenizer)
        self.n_mbs = n_mbs
        self.seed = seed
        self.prompt_len = prompt_len
        self.sources: dict[str, ModelSource] = {"actor": actor, "ref": actor if ref is None else ref}
        if "critic" in self.roles:
            self.sources["critic"] = actor if critic is None else critic
        self.critic_from_actor = critic is None
        self.reward_rule: Rule | None = None
        if reward is None or (callable(reward) and not isinstance(reward, ModelSpec)):
            from lightning_real.data.task import TaskReward

            self.reward_rule = reward if reward is not None else TaskReward(self.tokenizer)
        else:
            self.sources["reward"] = reward
        if val_reward is not None and not callable(val_reward):
            raise ValueError(
                f"{type(self).__name__} val_reward={val_reward!r}; allowed: a reward rule or None"
            )
        self.val_reward = val_reward
        self.val_at_start = val_at_start
        heads = {"actor": "lm", "ref": "lm", "critic": "value", "reward": "value"}
        self.specs: dict[str, ModelSpec] = {r: spec_of(s, heads[r]) for r, s in self.sources.items()}  # type: ignore[arg-type]
        if "reward" not in self.specs:
            # A rule has no model; the planner prices its call with the actor's size (an upper bound).
            self.specs["reward"] = self.specs["actor"].with_head("value")

    # ---- declarations -------------------------------------------------------------------------
    def role_training(self, role: str) -> Training | None:
        """How ``role`` learns (None: frozen)."""
        return None

    def real_roles(self) -> tuple[RoleDecl, ...]:
        out = []
        for i, role in enumerate(self.roles):
            if role not in self.sources:
                continue  # a rule-based reward has no model
            spec = self.specs[role]
            value_from_lm = spec.head == "value" and (role != "critic" or self.critic_from_actor)
            # A role built from the actor's source starts from the actor's weights.
            seed = self.seed if self.sources[role] is self.sources["actor"] else self.seed + i
            out.append(
                RoleDecl(role, self.sources[role], spec, seed, value_from_lm, self.role_training(role))
            )
        return tuple(out)

    def real_specs(self) -> dict[str, ModelSpec]:
        roles = self.real_graph().roles()
        return {r: s for r, s in self.specs.items() if r in roles}

    @property
    def reward_needs_index(self) -> bool:
        """Whether the reward reads the prompts' row numbers (the graph then carries them)."""
        return self.reward_rule is not None and needs_index(self.reward_rule)

    @property
    def prompts_per_step(self) -> int:
        """Prompts one iteration reads from the data module (its batch size)."""
        return self.batch_size

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        rows = int(batch["prompts"].shape[0])
        want = self.prompts_per_step
        if rows != want:
            reads = f"batch_size={want}"
            if want != self.batch_size:
                reads = f"reads {want} per iteration ({self._prompts_reason()})"
            raise ValueError(
                f"the data module gave {rows} prompts but {type(self).__name__} {reads}; "
                f"set the data module's batch size to {want} (and drop_last=True)"
            )
        src = {"prompts": batch["prompts"], "prompt_mask": batch["prompt_mask"]}
        if self.reward_needs_index:
            src["index"] = batch["index"]
        return src

    def _prompts_reason(self) -> str:
        """Why :attr:`prompts_per_step` differs from the batch size (for messages)."""
        return ""

    def seed_of_step(self) -> int:
        """This iteration's sampling seed."""
        return step_seed(self.seed, self.iteration)

    # ---- validation: greedy responses to held-out prompts, scored ----------------------------
    def evaluate(self, batch: Any) -> EvalSums:
        """Score greedy responses to one batch of prompts (collective: every rank, same batch)."""
        rule = self.val_reward if self.val_reward is not None else self.reward_rule
        rows = {k: batch[k] for k in ("prompts", "prompt_mask", "index") if k in batch}
        return evaluate_prompts(self._runtime(), rows, self.generation, rule)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        sums = self.evaluate(batch)
        n = max(1, int(sums.count))
        for key, value in self._val_metrics(sums).items():
            # every rank holds the same global figure, so the reduction leaves it as it is
            self.log(key, value, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)

    def _val_metrics(self, sums: EvalSums) -> dict[str, float]:
        # Lightning logs a validation after step N under step N - 1; val/step says how many
        # training steps the evaluated weights have taken (0 before training).
        return {**sums.metrics(), "val/step": float(self.global_step)}

    @override
    def on_train_start(self) -> None:
        if not self.val_at_start:
            return
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "val_dataloader"):
            raise ValueError(
                f"{type(self).__name__} val_at_start=True needs a data module with validation rows (val=...)"
            )
        total = EvalSums()
        for batch in dm.val_dataloader():
            total = total + self.evaluate(batch)
        for logger in self.trainer.loggers:
            logger.log_metrics(self._val_metrics(total), step=self.global_step)
