"""Supervised fine-tuning: negative log-likelihood of the response tokens."""

from __future__ import annotations

import math

import torch

from lightning_real.algorithms.masked import Reduction, reduce


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[labels]`` ``[B, T]`` from full-vocabulary logits ``[B, T, V]``.

    Shift first (``logits[:, :-1]`` against ``input_ids[:, 1:]``). Logits split over the
    vocabulary go through :func:`lightning_real.models.train.vocab_parallel_logprobs` instead.
    """
    lp = torch.log_softmax(logits.float(), dim=-1)
    return lp.gather(-1, labels.long().unsqueeze(-1)).squeeze(-1)


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "mean"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Masked NLL ``-mean(logp)`` over response tokens. Metric ``sft/loss`` (reduced like the loss)."""
    loss = reduce(-logp.float(), mask.float(), reduction)
    return loss, {"sft/loss": loss.detach()}


def perplexity(mean_nll: float) -> float:
    """``exp`` of a mean per-token NLL."""
    return math.exp(min(mean_nll, 50.0))
