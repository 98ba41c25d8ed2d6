"""GRPO (Shao et al., DeepSeekMath 2024): group-relative advantages, no critic, KL in the loss.

Each prompt's ``G`` responses sit in consecutive rows. A response's advantage is its score
minus its group's mean, divided by the group's standard deviation (unbiased, as TRL computes
it), the same for all its tokens. The loss is PPO's clipped surrogate plus ``beta`` times the
k3 estimate of KL(policy || reference) per token, averaged over each response's tokens and then
over responses (DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``). Shapes follow
:mod:`lightning_real.algorithms.ppo`.

:func:`grpo_loss` is :func:`lightning_real.algorithms.policy.combined_policy_loss` under
:meth:`GRPOConfig.policy_config`. The variants are settings of
:class:`~lightning_real.algorithms.policy.PolicyLossConfig` given to ``combined_policy_loss``:
Dr. GRPO (``scale_by_std=False`` here, ``loss_agg='seq-mean-token-sum-norm'`` with
``loss_agg_len`` = the generation length), DAPO's clip-higher (``clip_eps_high=0.28``) and
token-level mean (``loss_agg='token-mean'``), dual clip (``dual_clip``), GSPO's sequence ratio
(``PolicyLossConfig.gspo()``), other KL estimators and truncated importance sampling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from lightning_real.algorithms.masked import Reduction
from lightning_real.algorithms.policy import PolicyLossConfig, combined_policy_loss

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

    def policy_config(self) -> PolicyLossConfig:
        """The actor loss these settings describe: symmetric clip, KL loss with k3 when kl_coef > 0.

        The variants (clip-higher, dual clip, GSPO, the other aggregation modes, other KL
        estimators, TIS) are :class:`~lightning_real.algorithms.policy.PolicyLossConfig` settings
        of :func:`~lightning_real.algorithms.policy.combined_policy_loss`.
        """
        return PolicyLossConfig(
            clip_eps=self.clip_eps,
            loss_agg=self.loss_agg,
            use_kl_loss=self.kl_coef > 0,
            kl_loss_coef=self.kl_coef,
            kl_loss_estimator="k3",
        )


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

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``. With ``reduction="sum"`` the
    result is the numerator of ``cfg.loss_agg`` (for 'seq-mean-token-mean' the sum over
    sequences of their token means; for 'token-mean' the masked token sum): divide by the number
    of sequences, or of tokens for 'token-mean'. Without ``ref_logp`` (or with ``kl_coef=0``) the
    KL term is dropped and ``actor/kl_loss`` is 0.
    """
    pcfg = cfg.policy_config()
    if ref_logp is None:
        pcfg = replace(pcfg, use_kl_loss=False)
    loss, metrics = combined_policy_loss(
        logp, old_logp, advantages, mask, pcfg, ref_logp, reduction=reduction
    )
    if "actor/kl_loss" not in metrics:
        metrics["actor/kl_loss"] = torch.zeros_like(loss.detach())
    return loss, metrics


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
