"""The LightningDataModule of a recipe, with its rows read (and checked) before any launch."""

from __future__ import annotations

import re
from dataclasses import fields, replace

from lightning.pytorch import LightningDataModule

from lightning_real.data.modules import DataConfig
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import USES, Recipe
from lightning_real.registry import GRPO_FAMILY


def make_datamodule(recipe: Recipe) -> LightningDataModule:
    """The data module of the recipe's algorithm, its tokenizer loaded and its rows read.

    Reading here, in the launching process, turns a bad row into one message before any worker
    starts; spawned workers receive the rows already read.
    """
    from lightning_real.data.datasets import LengthError
    from lightning_real.data.modules import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lightning_real.data.rows import DataError

    kind = USES[recipe.algorithm].data
    cls = {"prompts": PromptDataModule, "sft": SFTDataModule, "preference": PreferenceDataModule}[kind]
    d = recipe.data
    config = DataConfig(**{f.name: getattr(d, f.name) for f in fields(DataConfig)})
    if recipe.algorithm in GRPO_FAMILY and recipe.grpo.prompt_rounds > 1:
        # dynamic sampling reads one batch of prompts per generation round
        config = replace(config, batch_size=d.batch_size * recipe.grpo.prompt_rounds)
    try:
        dm = cls(d.train, tokenizer=d.tokenizer, val=d.val, config=config)
        dm.setup("fit")
    except LengthError as e:
        raise RecipeError(f"key 'data.{e.limit}': {_keys(str(e))}") from None
    except (DataError, OSError) as e:
        raise RecipeError(str(e)) from None
    except (ValueError, TypeError) as e:
        raise RecipeError(f"data: {e}") from None
    n = len(dm.train_set)  # type: ignore[arg-type]
    if n < config.batch_size:
        rounds = (
            "" if config.batch_size == d.batch_size else f" x grpo.max_gen_rounds={recipe.grpo.prompt_rounds}"
        )
        dropped = getattr(dm.train_set, "num_rejected", 0)
        why = (
            f"; {dropped} rows over the length limit were dropped (data.truncation=reject)" if dropped else ""
        )
        raise RecipeError(
            f"key 'data.batch_size': {d.batch_size}{rounds} is more than the {n} rows of {d.train} "
            f"(after the length limits{why}); lower it or give more data"
        )
    return dm


def _keys(text: str) -> str:
    """A data-module message with its option names as recipe keys (max_len -> data.max_len)."""
    return re.sub(r"\b(?<!data\.)(max_prompt_len|max_len|truncation)\b", r"data.\1", text)
