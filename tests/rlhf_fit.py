"""Shared by the RLHF module tests: a 4-process gloo Trainer.fit and a weight dump after it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_real.data.modules import PromptDataModule
from lightning_real.data.task import asset
from lightning_real.strategy import RealStrategy


class DumpWeights(Callback):
    """After fit every rank joins the gathers; each model's first rank saves ``<out>/<role>.pt``."""

    def __init__(self, out: Path, roles: tuple[str, ...]) -> None:
        self.out = out
        self.roles = roles

    def on_train_end(self, trainer: Trainer, module: Any) -> None:
        from lightning_real.models.hf import gather_canonical

        for role in self.roles:
            tensors = gather_canonical(module.pool.models[role].home)
            if tensors is not None:
                torch.save(tensors, self.out / f"{role}.pt")


def fit(
    module: LightningModule,
    plan: Any,
    out: Path,
    steps: int,
    batch: int,
    roles: tuple[str, ...] = ("actor",),
    logger: Any = None,
    callbacks: tuple[Callback, ...] = (),
    ckpt_path: str | None = None,
    precision: str = "32-true",
    **strategy: Any,
) -> list[dict[str, str]]:
    """Train ``module`` for ``steps`` iterations on 4 CPU processes; the CSV rows with metrics.

    ``callbacks`` may include a ModelCheckpoint; ``ckpt_path`` resumes from a checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        strategy=RealStrategy(plan=plan, start_method="spawn", **strategy),
        accelerator="cpu",
        devices=4,
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        logger=logger if logger is not None else CSVLogger(out, name="csv"),
        callbacks=[DumpWeights(out, roles), *callbacks],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    data = PromptDataModule(asset("prompts"), batch_size=batch, max_prompt_len=24)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    if logger is not None:
        return []
    with open(next(out.rglob("metrics.csv"))) as f:
        return [r for r in csv.DictReader(f) if r.get("timing_s/iteration")]
