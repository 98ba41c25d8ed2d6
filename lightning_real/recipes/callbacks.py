"""Callbacks a recipe run adds: record the resolved recipe, export HF checkpoints at the end.

Both run inside the launched processes (spawned workers or torchrun ranks), where the process
group and the models exist; code after ``trainer.fit`` in the launching process has neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class RecipeLogCallback(Callback):
    """Writes the resolved recipe to ``output_dir/recipe.yaml`` and gives it to the logger."""

    def __init__(self, recipe: Mapping[str, Any], output_dir: str) -> None:
        self.recipe = dict(recipe)
        self.output_dir = output_dir

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero:
            import yaml

            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "recipe.yaml").write_text(yaml.safe_dump(self.recipe, sort_keys=False))
        for logger in trainer.loggers:
            logger.log_hyperparams(self.recipe)


class ExportCallback(Callback):
    """Writes each role's trained model as an HF checkpoint folder once training ends.

    ``save_hf`` is collective, so every rank runs this. The tokenizer is added by global rank 0
    only after every rank has returned from ``save_hf``: the folder is swapped in atomically by
    the first rank of the role's layout, which need not be rank 0.
    """

    def __init__(
        self,
        folders: Mapping[str, str],
        copy_files_from: Mapping[str, str | None],
        tokenizer: str | None,
        write_tokenizer: bool,
    ) -> None:
        self.folders = dict(folders)
        """Role -> export folder."""
        self.copy_files_from = dict(copy_files_from)
        """Role -> HF folder whose non-weight files (generation config, ...) go along, or None."""
        self.tokenizer = tokenizer
        """The data tokenizer's folder (None: the byte tokenizer)."""
        self.write_tokenizer = write_tokenizer
        """Write the tokenizer into each folder."""

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for role, folder in self.folders.items():
            pl_module.save_hf(role, folder, self.copy_files_from.get(role))  # type: ignore[operator]
            trainer.strategy.barrier(f"export_{role}_written")
            if self.write_tokenizer and trainer.is_global_zero:
                from lightning_real.data.tokenizer import load_tokenizer

                load_tokenizer(self.tokenizer).save_pretrained(folder)
            trainer.strategy.barrier(f"export_{role}_done")
