"""Command line of recipes: ``python -m lightning_real.recipes.run RECIPE [KEY=VALUE ...]``.

The same arguments as ``lightning-real run``; runs under ``torchrun --nproc-per-node N -m
lightning_real.recipes.run ...`` and ``fabric run .../lightning_real/recipes/run.py ...``.
A recipe error prints one line (``lightning-real run: error: ...``) and exits with status 2; a
rank that died or did not arrive is named in one such line by each rank that noticed
(:class:`~lightning_real.distributed.status.RankFailure`), with status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lightning_real.recipes.errors import RecipeError

if TYPE_CHECKING:
    from lightning.pytorch import Trainer

    from lightning_real.recipes.schema import Recipe

PROG = "lightning-real run"


def run(recipe: Recipe, argv: Sequence[str] | None = ()) -> Trainer:
    """Build and fit ``recipe`` (resuming from ``trainer.resume_from``); returns the Trainer.

    ``argv`` as :func:`~lightning_real.recipes.builder.build` takes it. The models are exported
    at the end of training, on every rank (:class:`~lightning_real.recipes.callbacks.ExportCallback`).
    """
    from lightning.pytorch import seed_everything

    from lightning_real.recipes.builder import build

    seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    trainer, module, dm = build(recipe, argv)
    trainer.fit(module, datamodule=dm, ckpt_path=recipe.trainer.resume_from)
    return trainer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of a recipe run (shared by ``lightning-real run`` and this module)."""
    parser.add_argument(
        "recipe", nargs="?", help="recipe YAML (e.g. recipes/ppo.yaml, recipes/tiny/sft.yaml)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dotted overrides applied after the file: actor.path=... trainer.devices=4 ppo.kl_coef=0.02",
    )
    parser.add_argument(
        "--check", action="store_true", help="check the recipe, its paths, data and plan; train nothing"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the recipe with the overrides applied, and exit"
    )
    parser.add_argument(
        "--help-config", action="store_true", help="print every recipe key with its default and meaning"
    )


def execute(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run parsed arguments; ``argv`` as :func:`lightning_real.recipes.builder.build` takes it."""
    from lightning_real.distributed.status import RankFailure

    try:
        return _execute(args, argv)
    except RecipeError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # the traceback would show only where this rank waited
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 1


def _execute(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    if args.help_config:
        from lightning_real.recipes.reference import reference

        print(reference())
        return 0
    if args.recipe is None:
        raise RecipeError("give a recipe YAML, e.g. lightning-real run recipes/tiny/sft.yaml")
    from lightning_real.recipes.load import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.print_config:
        import yaml

        from lightning_real.recipes.load import as_mapping

        print(yaml.safe_dump(as_mapping(recipe), sort_keys=False), end="")
        return 0
    if args.check:
        from lightning_real.recipes.builder import build

        _, _, dm = build(recipe, argv)
        rows = len(dm.train_set)  # type: ignore[attr-defined]
        print(f"{args.recipe}: ok ({recipe.algorithm}, plan {recipe.plan}, {rows} training rows)")
        return 0
    trainer = run(recipe, argv)
    if trainer.is_global_zero:
        _report(recipe.trainer.output_dir, recipe.export.dir)
    return 0


def _report(output_dir: str, export_dir: str | None) -> None:
    lines = [f"outputs in {Path(output_dir)}"]
    if export_dir is not None:
        lines.append(f"exported models in {Path(export_dir)}")
    print("; ".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``argv`` without the program name (None: this process's command line)."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_real.recipes.run",
        description="Train a recipe: a YAML file with dotted KEY=VALUE overrides (see docs/recipes.md).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    return execute(args, None if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
