"""The runtime features of a recipe: what ``lightning-real run`` builds and ``lightning-real plan`` prices.

One function, so the two commands can never disagree about what a recipe runs.
"""

from __future__ import annotations

from dataclasses import replace

from lightning_real.features import RuntimeFeatures, precision_of
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import Recipe


def recipe_features(recipe: Recipe) -> RuntimeFeatures:
    """``engine``, with ``trainer.precision`` when the recipe gives it."""
    features = recipe.engine
    given = recipe.trainer.precision
    if given is None:
        return features
    precision = precision_of(given)
    default = RuntimeFeatures().precision
    if features.precision not in (default, precision):
        raise RecipeError(
            f"key 'trainer.precision': {given!r}, but engine.precision is {features.precision!r}; "
            "give one of them"
        )
    return replace(features, precision=precision)  # type: ignore[arg-type]
