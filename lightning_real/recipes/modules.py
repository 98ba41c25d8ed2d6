"""The LightningModule of a recipe: its algorithm's module (:mod:`lightning_real.registry`), with
each role's model source.

Modules are imported only for the algorithm a recipe names, so a recipe of one algorithm runs
whatever state the other modules are in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_real.module import RLHFModule
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import ModelSourceConfig, Recipe
from lightning_real.registry import GRPO_FAMILY, lookup
from lightning_real.registry import module_class as registered_class


def module_class(algorithm: str) -> type[RLHFModule]:
    """The LightningModule class of ``algorithm``."""
    entry = lookup(algorithm)
    try:
        return registered_class(algorithm)
    except (ImportError, AttributeError) as e:
        raise RecipeError(
            f"algorithm {algorithm!r} needs {entry.module}.{entry.cls}, which cannot be imported ({e})"
        ) from None


def model_source(src: ModelSourceConfig, tokenizer: Any) -> Any:
    """What a module takes for a role: an HF folder, a tiny ModelSpec, a reward rule, or None."""
    if src.path is not None:
        return src.path
    if src.tiny is not None:
        from lightning_real.models.spec import tiny_spec

        return tiny_spec(src.tiny)
    if src.rule is not None:
        from lightning_real.data.task import TaskReward

        return TaskReward(tokenizer)
    return None


def verifiable_reward(recipe: Recipe, rows: str, tokenizer: Any) -> Any:
    """``reward.fn`` over the ground truths of the prompt file ``rows`` (its ``data.answer_key``
    field, by row number)."""
    from lightning_real.data.rows import DataError
    from lightning_real.data.verifiable import VerifiableReward, load_reward_fn, read_ground_truth

    assert recipe.reward.fn is not None
    try:
        fn = load_reward_fn(recipe.reward.fn)
    except ValueError as e:
        raise RecipeError(f"key 'reward.fn': {e}") from None
    try:
        truths = read_ground_truth(rows, recipe.data.answer_key)
    except DataError as e:
        raise RecipeError(f"{e}; reward.fn scores against each row's data.answer_key field") from None
    return VerifiableReward(fn, truths, tokenizer)


def make_module(recipe: Recipe, tokenizer: Any) -> RLHFModule:
    """The recipe's LightningModule (models are built later, when the strategy sets up)."""
    # Each algorithm's module has its own constructor; the arguments below follow each one.
    cls: Callable[..., RLHFModule] = module_class(recipe.algorithm)
    src = {
        role: model_source(getattr(recipe, role), tokenizer) for role in ("actor", "critic", "reward", "ref")
    }
    val_reward = None
    if recipe.reward.fn is not None:
        src["reward"] = verifiable_reward(recipe, recipe.data.train, tokenizer)
        if recipe.data.val is not None:
            val_reward = verifiable_reward(recipe, recipe.data.val, tokenizer)
    common: dict[str, Any] = {
        "batch_size": recipe.data.batch_size,
        "n_mbs": recipe.n_mbs,
        "seed": recipe.trainer.seed,
    }
    rl: dict[str, Any] = {
        "generation": recipe.generation,
        "actor_optim": recipe.optim,
        "tokenizer": tokenizer,
        "prompt_len": recipe.data.max_prompt_len,
        "val_reward": val_reward,
        "val_at_start": recipe.trainer.val_before_training,
    }
    a = recipe.algorithm
    try:
        if a == "sft":
            return cls(src["actor"], optim=recipe.optim, **common)
        if a == "rw":
            return cls(src["reward"], optim=recipe.optim, **common)
        if a == "dpo":
            return cls(src["actor"], src["ref"], dpo=recipe.dpo, optim=recipe.optim, **common)
        if a == "ppo":
            return cls(
                src["actor"],
                src["critic"],
                src["reward"],
                src["ref"],
                ppo=recipe.ppo,
                critic_optim=recipe.critic_optim,
                **rl,
                **common,
            )
        if a in GRPO_FAMILY:
            return cls(
                src["actor"],
                src["reward"],
                src["ref"],
                group_size=recipe.grpo.group_size,
                grpo=recipe.grpo,
                **rl,
                **common,
            )
        return cls(src["actor"], src["reward"], src["ref"], ppo=recipe.ppo, **rl, **common)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # e.g. the graph rejecting n_mbs, or actor and reference vocabularies that differ
        raise RecipeError(f"{cls.__name__}: {e}") from None
