"""Checks between the parts of a recipe: the plan against the module's graph and models, the
lengths against the models' positions, the tokenizer against their vocabularies.

Each would otherwise fail inside the launched processes, after the models are built.
"""

from __future__ import annotations

import re
from typing import Any

from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.launch import World
from lightning_real.recipes.schema import USES, Recipe


def module_graph(module: Any) -> Any:
    """The module's dataflow graph (the graph checks the microbatch counts)."""
    from lightning_real.dataflow import GraphError

    try:
        return module.real_graph()
    except GraphError as e:  # e.g. n_mbs naming a call the graph does not have
        raise RecipeError(f"key 'n_mbs': {e}") from None


MINIBATCH_KEYS: dict[str, str] = {"ppo": "ppo.minibatches", "grpo": "grpo.minibatches"}
"""The recipe key of each algorithm that sets its train calls' optimizer steps per batch."""


def plan_error_key(recipe: Recipe, error: Any) -> str:
    """The recipe key that set what a :class:`~lightning_real.plans.PlanError` is about: the
    microbatch count (``n_mbs``), the minibatches, GRPO's groups, or else the plan."""
    if error.cause == "microbatches" and not error.from_plan:
        n_mbs = recipe.n_mbs
        return f"n_mbs.{error.call}" if isinstance(n_mbs, dict) and error.call in n_mbs else "n_mbs"
    if error.cause == "minibatches" and recipe.algorithm in MINIBATCH_KEYS:
        return MINIBATCH_KEYS[recipe.algorithm]
    if error.cause == "groups" and recipe.algorithm == "grpo":
        return "grpo.group_size"
    return "plan"


def check_plan(recipe: Recipe, module: Any, graph: Any, world: World) -> None:
    """The plan fits the graph, the module's models and the world (a named 'search' runs later)."""
    from lightning_real.plans import PlanError, resolve_plan

    if isinstance(recipe.plan, str) and recipe.plan.strip().lower() == "search":
        return  # the planner's result is checked by the planner; searching twice would cost minutes
    try:
        resolve_plan(recipe.plan, graph, world.size, module.real_specs())  # search: checked when run
    except PlanError as e:
        # PlanError names the plan ('plan plan: ...'); here the key says which setting is at fault.
        text = re.sub(r"^plan \S+: ", "", str(e))
        raise RecipeError(
            f"key {plan_error_key(recipe, e)!r}: {text} (the run has {world.size} processes)"
        ) from None


def sequence_length(recipe: Recipe) -> tuple[int, str]:
    """Longest sequence a call sees, and the keys it comes from."""
    if USES[recipe.algorithm].data == "prompts":
        n = recipe.data.max_prompt_len + recipe.generation.max_new_tokens
        return n, "data.max_prompt_len + generation.max_new_tokens"
    return recipe.data.max_len, "data.max_len"


def check_models(recipe: Recipe, module: Any, tokenizer: Any) -> None:
    """Every model holds the longest sequence and every token id of the tokenizer."""
    n, keys = sequence_length(recipe)
    vocab = len(tokenizer)
    for role, spec in module.real_specs().items():
        if getattr(recipe, role).rule is not None:
            continue  # a rule-based reward: its spec is a stand-in for the planner
        if n > spec.max_position_embeddings:
            raise RecipeError(
                f"{keys} = {n} exceeds the {role} model's {spec.max_position_embeddings} positions "
                "(max_position_embeddings); lower them"
            )
        if vocab > spec.vocab_size:
            raise RecipeError(
                f"the tokenizer has {vocab} tokens but the {role} model's vocabulary has {spec.vocab_size}; "
                "give the model's own tokenizer (data.tokenizer)"
            )


def check_features(recipe: Recipe) -> None:
    """The recipe's runtime features are ones this runtime builds."""
    from lightning_real.features import FeatureError
    from lightning_real.recipes.features import recipe_features
    from lightning_real.runtime.build import check_features as runnable

    try:
        runnable(recipe_features(recipe))
    except FeatureError as e:
        raise RecipeError(f"key 'engine': {e}") from None


def crosscheck(recipe: Recipe, module: Any, tokenizer: Any, world: World) -> None:
    """All checks between the recipe's parts."""
    check_features(recipe)
    graph = module_graph(module)
    check_models(recipe, module, tokenizer)
    check_plan(recipe, module, graph, world)
