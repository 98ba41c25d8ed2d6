"""The Lightning Trainer of a recipe: RealStrategy with the plan, logger, checkpoints, export.

Building it writes nothing: loggers and checkpoint callbacks create their folders on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer

from lightning_real.recipes.callbacks import ExportCallback, RecipeLogCallback
from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.launch import World
from lightning_real.recipes.load import as_mapping
from lightning_real.recipes.schema import ModelSourceConfig, Recipe
from lightning_real.recipes.validate import export_roles


def make_logger(recipe: Recipe) -> Any:
    """The Lightning loggers of ``trainer.logger`` (False for 'none').

    W&B runs also keep the CSV file, so ``lightning-real plot`` works without the W&B server.
    """
    t = recipe.trainer
    if t.logger == "none":
        return False
    from lightning.pytorch.loggers import CSVLogger

    csv = CSVLogger(save_dir=t.output_dir, name="logs")
    if t.logger == "csv":
        return csv
    from lightning.pytorch.loggers import WandbLogger

    wandb = WandbLogger(
        project=t.wandb_project, name=t.wandb_name, save_dir=t.output_dir, offline=t.wandb_offline
    )
    return [wandb, csv]


def make_callbacks(recipe: Recipe) -> list[Any]:
    """Recipe record, HF export and periodic checkpoints."""
    t = recipe.trainer
    callbacks: list[Any] = [RecipeLogCallback(as_mapping(recipe), t.output_dir)]
    roles = export_roles(recipe)
    if roles:
        assert recipe.export.dir is not None
        callbacks.append(
            ExportCallback(
                folders={r: str(Path(recipe.export.dir) / r) for r in roles},
                copy_files_from={r: _source_folder(recipe, r) for r in roles},
                tokenizer=recipe.data.tokenizer,
                write_tokenizer=recipe.export.tokenizer,
            )
        )
    if t.checkpoint_every_n_steps > 0:
        from lightning.pytorch.callbacks import ModelCheckpoint

        # monitor='step' (mode max) makes save_top_k keep the newest checkpoints.
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(Path(t.output_dir) / "checkpoints"),
                filename="step{step:06d}",
                auto_insert_metric_name=False,
                every_n_train_steps=t.checkpoint_every_n_steps,
                save_top_k=t.keep_checkpoints,
                monitor="step",
                mode="max",
                save_last=True,
            )
        )
    return callbacks


def _source_folder(recipe: Recipe, role: str) -> str | None:
    # The critic starts from the actor when unset; its side files are the actor's then.
    src: ModelSourceConfig = getattr(recipe, role)
    if src.path is None and role == "critic":
        src = recipe.actor
    return src.path


def make_trainer(recipe: Recipe, world: World, start_method: str) -> Trainer:
    """The Trainer that runs the recipe on ``world`` processes."""
    from lightning_real.recipes.features import recipe_features
    from lightning_real.strategy import RealStrategy

    t, s = recipe.trainer, recipe.strategy
    features = recipe_features(recipe)
    # every N steps, across epoch boundaries (Lightning otherwise validates per epoch)
    val: dict[str, Any] = (
        {"val_check_interval": t.val_every_n_steps, "check_val_every_n_epoch": None}
        if t.val_every_n_steps
        else {}
    )
    strategy = RealStrategy(
        plan=recipe.plan,
        gpus_per_node=s.gpus_per_node,
        features=features,
        trace_dir=str(Path(t.output_dir) / "traces") if s.trace else None,
        search_steps=s.search_steps,
        timeout_s=s.timeout_s,
        start_method=start_method,
    )
    try:
        return Trainer(
            accelerator=t.accelerator,
            devices=world.devices,
            num_nodes=world.num_nodes,
            strategy=strategy,
            precision=features.precision,
            max_steps=t.max_steps,
            max_epochs=-1,
            log_every_n_steps=t.log_every_n_steps,
            logger=make_logger(recipe),
            callbacks=make_callbacks(recipe),
            enable_checkpointing=t.checkpoint_every_n_steps > 0,
            enable_model_summary=True,  # RealStrategy shows its role summary in its place
            enable_progress_bar=t.progress_bar,
            num_sanity_val_steps=0,
            **val,
            default_root_dir=t.output_dir,
            # The data module's seeded sampler gives every rank the same global batch already.
            use_distributed_sampler=False,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as e:
        raise RecipeError(
            f"trainer: Lightning cannot run accelerator={t.accelerator!r} with {world.devices} devices "
            f"x {world.num_nodes} nodes here: {e}"
        ) from None
