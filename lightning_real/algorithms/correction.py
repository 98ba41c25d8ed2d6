"""Rollout correction: truncated importance sampling (TIS) between the rollout engine and the trainer.

A fast rollout engine (vLLM, SGLang, a quantised or differently fused kernel) samples from a
policy ``pi_rollout`` slightly different from the training model's ``pi_old`` at the same
weights, so the samples are off-policy for the trainer. Yao et al. (2025, "Your efficient RL
framework secretly brings you off-policy RL training") reweight each token's policy-gradient
loss by the importance ratio truncated at ``C``::

    w_t = min(exp(old_logp_t - rollout_logp_t), C)        (no gradient; C = 2 by default)

where ``old_logp`` are the log-probs the training model gives the sampled tokens before the update
and ``rollout_logp`` those the engine reported while sampling. verl calls the same weights
``rollout_is_weights`` (token level, truncated). With the native engine both are the same numbers
and every weight is exactly 1. Shapes follow :mod:`lightning_real.algorithms.ppo`.
"""

from __future__ import annotations

import torch

from lightning_real.algorithms.aggregation import LossAgg, agg_loss
from lightning_real.algorithms.masked import Reduction

TIS_CAP = 2.0
"""Default truncation C of the importance weights (Yao et al.)."""


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float = TIS_CAP) -> torch.Tensor:
    """``min(exp(old_logp - rollout_logp), cap)`` per token ``[B, T]``, detached (a loss weight).

    The log-ratio is clamped to [-20, 20] before ``exp`` so one token cannot overflow.
    """
    if not cap > 0:
        raise ValueError(f"tis cap={cap!r}; allowed: a number > 0")
    log_w = (old_logp.detach().float() - rollout_logp.detach().float()).clamp(-20.0, 20.0)
    return torch.exp(log_w).clamp(max=float(cap))


def tis_metrics(
    old_logp: torch.Tensor,
    rollout_logp: torch.Tensor,
    mask: torch.Tensor,
    cap: float = TIS_CAP,
    reduction: Reduction = "mean",
    loss_agg: LossAgg = "token-mean",
    loss_agg_len: int | None = None,
) -> dict[str, torch.Tensor]:
    """``actor/tis_weight_mean`` (truncated weights), ``actor/tis_clipfrac`` (share of tokens whose
    ratio exceeds ``cap``) and ``actor/rollout_kl`` (``rollout_logp - old_logp``, the k1 estimate of
    KL(rollout || old)), aggregated as the loss is."""
    m = mask.float()
    w = tis_weights(old_logp, rollout_logp, cap)
    log_w = (old_logp.detach().float() - rollout_logp.detach().float()).clamp(-20.0, 20.0)
    over = (log_w > torch.log(torch.tensor(float(cap)))).float()

    def agg(x: torch.Tensor) -> torch.Tensor:
        return agg_loss(x, m, loss_agg, reduction, loss_agg_len)

    return {
        "actor/tis_weight_mean": agg(w),
        "actor/tis_clipfrac": agg(over),
        "actor/rollout_kl": agg(-log_w),
    }
