"""GRPO (Shao et al., DeepSeekMath 2024): group-relative advantages, no critic, KL in the loss.

Each prompt's ``G`` responses sit in consecutive rows. A response's advantage is its score
minus its group's mean, divided by the group's standard deviation (unbiased, as TRL computes
it), the same for all its tokens. The loss is PPO's clipped surrogate plus ``beta`` times the
k3 estimate of KL(policy || reference) per token, averaged over each response's tokens and then
over responses (DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``). Shapes follow
:mod:`lightning_real.algorithms.ppo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_real.algorithms.masked import Reduction, masked_mean, reduce
from lightning_real.algorithms.ppo import kl_per_token

LOSS_AGGS: tuple[str, ...] = ("seq-mean-token-mean", "token-mean")


@dataclass(frozen=True)
class GRPOConfig:
    """GRPO hyper-parameters (defaults follow DeepSeekMath and TRL)."""

    group_size: int = 8
    """Responses sampled per prompt (G)."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    kl_coef: float = 0.04
    """Weight beta of the per-token KL term in the loss (0 drops the reference model)."""
    scale_by_std: bool = True
    """Divide by the group's std; False keeps only the mean baseline (Dr. GRPO)."""
    eps: float = 1e-4
    """Added to the group std so a group of equal scores gets advantage 0, not NaN."""
    loss_agg: Literal["seq-mean-token-mean", "token-mean"] = "seq-mean-token-mean"
    """'seq-mean-token-mean': mean over each response's tokens, then over responses (the paper);
    'token-mean': one mean over all tokens of the batch (DAPO)."""
    minibatches: int = 1
    """Optimizer steps per iteration, each on a 1/minibatches share of the batch (1: on-policy)."""

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size={self.group_size!r}; allowed: an integer >= 2")
        for f in ("clip_eps", "kl_coef", "eps"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or v < 0:
                raise ValueError(f"GRPOConfig.{f}={v!r}; allowed: a number >= 0")
        if not isinstance(self.minibatches, int) or self.minibatches < 1:
            raise ValueError(f"GRPOConfig.minibatches={self.minibatches!r}; allowed: an integer >= 1")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"GRPOConfig.loss_agg={self.loss_agg!r}; allowed: {', '.join(LOSS_AGGS)}")


def group_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """``(s - mean_group) / (std_group + eps)`` per sequence ``[B]``; rows of a group are consecutive."""
    s = scores.float()
    if s.dim() != 1 or s.numel() % group_size:
        raise ValueError(
            f"group_advantages: scores of shape {tuple(s.shape)} do not split into groups of {group_size}"
        )
    g = s.view(-1, group_size)
    adv = g - g.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus ``kl_coef`` x k3 KL per token, aggregated as ``cfg.loss_agg``.

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``. With ``reduction="sum"`` and
    'seq-mean-token-mean' the result is the sum over sequences of their token means (divide by
    the number of sequences); with 'token-mean' the masked token sum.
    """
    m = mask.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(m)
    # Per-token losses first, then the chosen aggregation.
    log_ratio = (logp - old_logp).float()
    ratio = torch.exp(log_ratio.clamp(-20.0, 20.0))
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps)
    per_tok = torch.maximum(l1, l2)
    clipped = (l2 > l1).float()
    kl = torch.zeros_like(per_tok)
    if ref_logp is not None and cfg.kl_coef:
        kl = kl_per_token(logp.float(), ref_logp.float(), "k3")
    total = per_tok + cfg.kl_coef * kl

    def agg(x: torch.Tensor) -> torch.Tensor:
        if cfg.loss_agg == "token-mean":
            return reduce(x, m, reduction)
        per_seq = masked_mean(x, m, dim=-1)
        return per_seq.mean() if reduction == "mean" else per_seq.sum()

    metrics = {
        "actor/pg_loss": agg(per_tok.detach()),
        "actor/pg_clipfrac": agg(clipped),
        "actor/ppo_kl": agg(-log_ratio.detach()),
        "actor/kl_loss": agg(kl.detach()),
    }
    return agg(total), metrics


def grpo_metrics(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> dict[str, float]:
    """Batch statistics: reward/mean, the share of groups whose scores are all equal (no signal),
    response_length/mean."""
    g = scores.float().view(-1, group_size)
    return {
        "reward/mean": float(g.mean()),
        "reward/group_std": float(g.std(-1).mean()),
        "reward/zero_std_frac": float((g.std(-1) == 0).float().mean()),
        "response_length/mean": float(mask.float().sum(-1).mean()),
    }
