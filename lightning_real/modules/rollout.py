"""Base of the modules that sample from the actor (PPO, GRPO, ReMax): models, pool and engines.

It owns what the three share: the tokenizer and sampling defaults, the model sources by role
(a reward may be a rule instead of a model), building each role's home shard on the layout of
its *home call* with a reallocator for moves to its other calls, one training engine per
trained role, the prompt source keys and checkpoint state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.spec import ModelSpec
from lightning_real.module import ModelSource, RLHFModule, load_home, spec_of
from lightning_real.modules.calls import RewardFn, Rows

RewardSource = ModelSource | RewardFn
"""A reward model (HF folder or ModelSpec, value head) or a rule ``(seq, attention_mask, loss_mask) -> [B]``."""


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
    """Shared set-up of the generating algorithms; subclasses declare :attr:`homes` and the calls.

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
    """

    homes: ClassVar[dict[str, str]] = {}
    """Role -> the call whose layout holds the role's persistent copy (the training call for
    trained models, where their optimizer state lives)."""
    trained: ClassVar[tuple[str, ...]] = ("actor",)
    """Roles with an optimizer."""

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
        self.sources: dict[str, ModelSource] = {"actor": actor, "ref": actor if ref is None else ref}
        if "critic" in self.homes:
            self.sources["critic"] = actor if critic is None else critic
        self.critic_from_actor = critic is None
        self.reward_rule: RewardFn | None = None
        if reward is None or (callable(reward) and not isinstance(reward, ModelSpec)):
            from lightning_real.data.task import TaskReward

            self.reward_rule = reward if reward is not None else TaskReward(self.tokenizer)  # type: ignore[assignment]
        else:
            self.sources["reward"] = reward  # type: ignore[assignment]
        heads = {"actor": "lm", "ref": "lm", "critic": "value", "reward": "value"}
        self.specs: dict[str, ModelSpec] = {r: spec_of(s, heads[r]) for r, s in self.sources.items()}  # type: ignore[arg-type]
        if "reward" not in self.specs:
            # A rule has no model; the planner prices its call with the actor's size (an upper bound).
            self.specs["reward"] = self.specs["actor"].with_head("value")
        self.engines: dict[str, Any] = {}

    # ---- protocol -------------------------------------------------------------------------------
    def real_specs(self) -> dict[str, ModelSpec]:
        roles = self.real_graph().roles()
        return {r: s for r, s in self.specs.items() if r in roles}

    def make_source(self, batch: Any) -> dict[str, torch.Tensor]:
        rows = int(batch["prompts"].shape[0])
        if rows != self.batch_size:
            raise ValueError(
                f"the data module gave {rows} prompts but {type(self).__name__} batch_size={self.batch_size}; "
                "set both to the same number (and drop_last=True)"
            )
        return {"prompts": batch["prompts"], "prompt_mask": batch["prompt_mask"]}

    # ---- set-up -----------------------------------------------------------------------------------
    def build_pool(self, strategy: Any) -> None:
        """Every role's home shard (collective: all ranks, same order) and its reallocator."""
        from lightning_real.realloc import Reallocator
        from lightning_real.runtime.pool import ModelPool, PooledModel

        plan, reg = strategy.plan, strategy.registry
        self.pool = ModelPool()
        for i, (role, call) in enumerate(self.homes.items()):
            if role not in self.sources or call not in plan:
                continue
            spec = self.specs[role]
            value_from_lm = spec.head == "value" and (role != "critic" or self.critic_from_actor)
            # A role built from the actor's source starts from the actor's weights.
            seed = self.seed if self.sources[role] is self.sources["actor"] else self.seed + i
            home = load_home(
                self.sources[role], spec, reg.for_layout(plan[call]), seed, init_value_head=value_from_lm
            )
            frozen = role not in self.trained
            self.pool.add(PooledModel(role, home, Reallocator(spec, reg), keep_copies=frozen))

    def build_engine(
        self,
        role: str,
        loss_fn: Callable[[torch.Tensor, Rows], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        optim: OptimConfig,
        n_mbs: int,
        norm_key: str | None = "action_mask",
    ) -> Any:
        """A training engine for ``role``'s home shard."""
        from lightning_real.models.train import TrainConfig, TrainEngine

        home: ModelShard = self.pool.models[role].home
        engine = TrainEngine(home, loss_fn, TrainConfig(n_mbs=n_mbs, norm_key=norm_key, optim=optim))
        self.engines[role] = engine
        return engine

    def seed_of_step(self) -> int:
        """This iteration's sampling seed."""
        return step_seed(self.seed, self.iteration)

    # ---- checkpoints --------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Algorithm state beyond weights and optimizers (KL controllers, running statistics)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""

    def real_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"extra": self.extra_state()}
        for role, engine in self.engines.items():
            state[role] = self.shard_state_dict(role)
            state[f"{role}_optim"] = engine.state_dict()
        return state

    def load_real_state_dict(self, state: dict[str, Any]) -> None:
        for role, engine in self.engines.items():
            self.load_shard_state_dict(role, state[role])
            engine.load_state_dict(state[f"{role}_optim"])
        self.load_extra_state(state.get("extra", {}))
