"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization"): a sequence-level importance ratio.

GRPO's token ratios ``pi(y_t) / pi_old(y_t)`` are noisy per token; GSPO clips one ratio per
response, the geometric mean of its token ratios over its ``|y_i|`` response tokens::

    s_i = exp(1/|y_i| sum_t (logp_t - old_logp_t))

and optimises ``1/G sum_i min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i)``. The clip
range is tiny because ``s_i`` is a per-token geometric mean (the paper: 3e-4 and 4e-4).

The token form the paper gives (GSPO-token) is used so that token-level advantages and any
aggregation mode work: ``s_i,t = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, equal to ``s_i`` in value,
with gradient ``s_i * grad logp_t``. With a per-sequence advantage and 'seq-mean-token-mean'
aggregation (the default) its gradient is exactly that of the sequence objective. Shapes follow
:mod:`lightning_real.algorithms.ppo`.
"""

from __future__ import annotations

import torch

from lightning_real.algorithms.aggregation import LossAgg, agg_loss, check_loss_agg
from lightning_real.algorithms.masked import Reduction, masked_mean

GSPO_CLIP_EPS = 3e-4
"""Lower clip of the sequence ratio in the paper."""
GSPO_CLIP_EPS_HIGH = 4e-4
"""Upper clip of the sequence ratio in the paper."""


def sequence_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``log s_i = mean over the response tokens of (logp - old_logp)``, ``[B]`` (0 for an empty row)."""
    return masked_mean((logp - old_logp).float(), mask.float(), dim=-1)


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = GSPO_CLIP_EPS,
    clip_eps_high: float | None = GSPO_CLIP_EPS_HIGH,
    reduction: Reduction = "mean",
    *,
    weights: torch.Tensor | None = None,
    loss_agg: LossAgg = "seq-mean-token-mean",
    loss_agg_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO-token loss ``max(-A s_i,t, -A clip(s_i,t, 1 - eps, 1 + eps_high))`` per token, aggregated.

    ``advantages`` is ``[B]`` or ``[B, T]``; ``weights`` (``[B, T]``, no gradient) multiply the
    per-token loss (truncated importance sampling). The sequence log-ratio is clamped to
    [-20, 20] before ``exp`` (its value only; the token term keeps its gradient). Metrics, aggregated
    as the loss: ``actor/pg_loss``, ``actor/pg_clipfrac`` (share of tokens of clipped sequences),
    ``actor/pg_clipfrac_lower`` (0: no dual clip), ``actor/ppo_kl`` (``old_logp - logp``).
    """
    check_loss_agg(loss_agg, loss_agg_len)
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    m = mask.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(m)
    lp = logp.float()
    log_ratio = lp - old_logp.float()
    seq = sequence_log_ratio(logp, old_logp, mask).detach().clamp(-20.0, 20.0)
    ratio = torch.exp(seq.unsqueeze(-1) + lp - lp.detach())
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    loss = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1).float()
    if weights is not None:
        loss = loss * weights.detach().float()

    def agg(x: torch.Tensor) -> torch.Tensor:
        return agg_loss(x, m, loss_agg, reduction, loss_agg_len)

    metrics = {
        "actor/pg_loss": agg(loss.detach()),
        "actor/pg_clipfrac": agg(clipped),
        "actor/pg_clipfrac_lower": agg(torch.zeros_like(loss)),
        "actor/ppo_kl": agg(-log_ratio.detach()),
    }
    return agg(loss), metrics
