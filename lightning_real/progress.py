"""Progress bars that count iterations.

An RLHF run is ``max_steps`` iterations with ``max_epochs=-1``; Lightning's bars count the
batches of an epoch and label them ``Epoch 0/-2``. These count the global step against
``max_steps`` (``Iteration 12/40``), across epochs and from where a resumed run starts. With
``max_steps`` unset they behave as Lightning's.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from typing_extensions import override

LABEL = "Iteration"


def counts_iterations(trainer: Trainer) -> bool:
    """Whether the run has a number of iterations to count to."""
    return trainer.max_steps is not None and trainer.max_steps > 0


class IterationTQDMBar(TQDMProgressBar):
    """Lightning's tqdm bar, counting the global step against ``max_steps``."""

    @property
    @override
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if counts_iterations(self.trainer) else super().total_train_batches

    @override
    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if counts_iterations(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.set_description(LABEL)
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.refresh()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Lightning's bar shows batch_idx + 1; the iteration just finished is the global step.
        index = trainer.global_step - 1 if counts_iterations(trainer) else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, index)


class IterationRichBar(RichProgressBar):
    """Lightning's rich bar, counting the global step against ``max_steps``."""

    @property
    @override
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if counts_iterations(self.trainer) else super().total_train_batches

    @override
    def _get_train_description(self, current_epoch: int) -> str:
        if counts_iterations(self.trainer):
            return LABEL
        return super()._get_train_description(current_epoch)

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        if counts_iterations(trainer) and self.train_progress_bar_id is not None:
            self._update(self.train_progress_bar_id, trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        index = trainer.global_step - 1 if counts_iterations(trainer) else batch_idx
        super().on_train_batch_end(trainer, pl_module, outputs, batch, index)


def iteration_bar(bar: ProgressBar) -> ProgressBar | None:
    """The iteration-counting twin of one of Lightning's default bars, with its settings; None
    for any other bar (a user's own bar is left as it is)."""
    if type(bar) is TQDMProgressBar:
        twin: ProgressBar = IterationTQDMBar(refresh_rate=bar.refresh_rate, leave=bar._leave)
    elif type(bar) is RichProgressBar:
        twin = IterationRichBar(
            refresh_rate=int(bar.refresh_rate),
            leave=bar._leave,
            theme=bar.theme,
            console_kwargs=bar._console_kwargs,
        )
    else:
        return None
    return twin
