"""Prompts and a training step shared by the vLLM tests (the single-rank and the tensor-parallel one)."""

from __future__ import annotations

import functools
from typing import Any

import torch

from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.train import TrainConfig, TrainEngine
from lightning_real.models.vocab_parallel import vocab_parallel_logprobs

PAD = 0
# Prompt widths: the longest spans more than one KV-cache block, so a prefix cache that kept
# keys and values of the old weights would change that row's tokens after an update.
LENGTHS = (70, 9, 3, 40)


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of :data:`LENGTHS` tokens and their mask."""
    g = torch.Generator().manual_seed(0)
    s = max(LENGTHS)
    ids = torch.randint(3, 250, (len(LENGTHS), s), generator=g)
    mask = torch.zeros(len(LENGTHS), s, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        mask[row, s - n :] = 1
    return ids * mask + PAD * (1 - mask), mask


def _lm_loss(
    tp_group: Any, output: torch.Tensor, mb: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = mb["loss_mask"].float()
    return -(vocab_parallel_logprobs(output, mb["labels"], tp_group) * m).sum(), {}


def train_one_step(shard: ModelShard) -> None:
    """One next-token training step (lr 3e-2: large enough to change greedy tokens)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 250, (4, 24), generator=g)
    loss_mask = torch.ones_like(ids)
    loss_mask[:, -1] = 0
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.roll(ids, -1, 1),
        "loss_mask": loss_mask,
    }
    loss = functools.partial(_lm_loss, shard.groups.tp)
    TrainEngine(shard, loss, TrainConfig(optim=OptimConfig(lr=3e-2))).step(batch)
