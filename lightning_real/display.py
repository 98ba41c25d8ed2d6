"""What an RLHF run shows: Lightning's default model summary and progress bar, replaced.

:func:`replace_default_callbacks` swaps the Trainer's default :class:`ModelSummary` (or its rich
form) for :class:`~lightning_real.summary.RoleSummary` and its default bar for one counting
iterations (:mod:`lightning_real.progress`). Callbacks the user passed are left alone:
``enable_model_summary=False`` keeps the summary off, a custom bar stays.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from lightning_real.progress import iteration_bar
from lightning_real.summary import RoleSummary


def replace_default_callbacks(trainer: Trainer) -> None:
    """Replace the default summary and bar in ``trainer.callbacks`` (idempotent; every rank)."""
    callbacks: list[Any] = []
    for c in trainer.callbacks:  # type: ignore[attr-defined]
        if type(c) in (ModelSummary, RichModelSummary):
            callbacks.append(RoleSummary())
            continue
        if isinstance(c, ProgressBar):
            twin = iteration_bar(c)
            if twin is not None:
                # The original bar's setup hook has already run: bind the trainer (and disable
                # the bar off rank 0) as that hook would.
                twin.setup(trainer, trainer.lightning_module, "fit")
                callbacks.append(twin)
                continue
        callbacks.append(c)
    trainer.callbacks = callbacks  # type: ignore[attr-defined]
