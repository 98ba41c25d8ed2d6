"""Recipes: train from a YAML file and a data set instead of Python.

``load_recipe(path, overrides)`` reads and checks a recipe into a :class:`Recipe`;
``build(recipe)`` makes the Trainer, LightningModule and LightningDataModule (checking paths,
rows and the plan first, writing nothing); ``lightning_real.recipes.run.run(recipe)`` fits
them; ``main(argv)`` is the command line (``lightning-real run``,
``python -m lightning_real.recipes.run``).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "RecipeError": "lightning_real.recipes.errors",
    "Recipe": "lightning_real.recipes.schema",
    "load_recipe": "lightning_real.recipes.load",
    "build": "lightning_real.recipes.builder",
    "main": "lightning_real.recipes.run",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    # Lazy: the command-line parser imports this package, and torch should load only for a run.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_real.recipes' has no attribute {name!r}")
