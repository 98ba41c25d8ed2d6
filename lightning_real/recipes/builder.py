"""A recipe into the three Lightning objects, every check first.

:func:`build` checks everything it can without launching processes (keys, paths, rows, plan,
lengths) and writes nothing; :func:`lightning_real.recipes.run.run` then fits, and the
callbacks write the logs, checkpoints and exported models.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lightning_real.recipes.crosscheck import crosscheck
from lightning_real.recipes.datamodule import make_datamodule
from lightning_real.recipes.launch import resolve_world, start_method
from lightning_real.recipes.modules import make_module
from lightning_real.recipes.schema import Recipe
from lightning_real.recipes.trainer import make_trainer
from lightning_real.recipes.validate import validate


def build(
    recipe: Recipe, argv: Sequence[str] | None = ()
) -> tuple[Trainer, LightningModule, LightningDataModule]:
    """The Trainer, LightningModule and LightningDataModule of ``recipe``, all checked.

    ``argv`` are the command-line arguments the recipe came from (None: this process's own),
    which decide whether Lightning may re-run the command line to start ranks (see
    :func:`~lightning_real.recipes.launch.start_method`); ``()`` means it came from Python.
    """
    validate(recipe)
    world = resolve_world(recipe.trainer)
    dm = make_datamodule(recipe)
    module = make_module(recipe, dm.tokenizer)  # type: ignore[attr-defined]
    crosscheck(recipe, module, dm.tokenizer, world)  # type: ignore[attr-defined]
    trainer = make_trainer(recipe, world, start_method(recipe.trainer, argv))
    return trainer, module, dm
