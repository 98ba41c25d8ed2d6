"""Reward-model training on preference pairs: the Bradley-Terry loss ``-log sigmoid(r_c - r_r)``.

A reward model scores a sequence with its value head's output at the sequence's last token
(:func:`last_token_scores`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_real.algorithms.masked import Reduction
from lightning_real.algorithms.ppo import last_index


def last_token_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence score ``[B]``: the value-head output ``[B, S]`` at each row's last real token."""
    return values.float().gather(-1, last_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def pairwise_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: torch.Tensor | float = 0.0,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-log sigmoid(r_c - r_r - margin)`` over ``[B]`` pairs.

    Metrics: ``rm/loss``, ``rm/accuracy`` (share of pairs with ``r_c > r_r``), ``rm/chosen_reward``,
    ``rm/rejected_reward``, ``rm/margin``; reduced like the loss (means, or sums over pairs).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; allowed: mean, sum")
    c, r = chosen.float(), rejected.float()
    losses = -F.logsigmoid(c - r - margin)

    def red(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if reduction == "mean" else x.sum()

    metrics = {
        "rm/loss": red(losses.detach()),
        "rm/accuracy": red((c > r).float()),
        "rm/chosen_reward": red(c.detach()),
        "rm/rejected_reward": red(r.detach()),
        "rm/margin": red((c - r).detach()),
    }
    return red(losses), metrics
