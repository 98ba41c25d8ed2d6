"""ReMax (Li et al., 2023): REINFORCE with the reward of the greedy response as the baseline.

Per prompt, one sampled and one greedy (arg-max) response are scored. The sampled response's
per-action rewards are the KL penalty against the reference plus, on its last action,
``score - greedy_score``; its advantages are the undiscounted rewards-to-go. No critic is
trained. The actor loss is :func:`lightning_real.algorithms.ppo.policy_loss` (one on-policy
step: the ratio is 1 and the loss is plain REINFORCE). Shapes follow
:mod:`lightning_real.algorithms.ppo`.
"""

from __future__ import annotations

import torch

from lightning_real.algorithms.ppo import KLLossEstimator, token_rewards


def remax_advantages(
    scores: torch.Tensor,
    greedy_scores: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    estimator: KLLossEstimator = "k1",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages ``[B, T]``: rewards-to-go of (KL penalty + baseline-subtracted score).

    Without ``logp``/``ref_logp`` (or with ``kl_coef=0``) every masked action of a row gets
    ``score - greedy_score``.
    """
    m = mask.float()
    shaped = scores.float() - greedy_scores.float()
    if logp is None or ref_logp is None:
        logp = ref_logp = torch.zeros_like(m)
    rewards, kl = token_rewards(shaped, logp, ref_logp, mask, kl_coef, estimator)
    # Reverse cumulative sum over the row: the return from each action on (gamma = 1).
    adv = torch.flip(torch.cumsum(torch.flip(rewards, [-1]), -1), [-1]) * m
    metrics = {
        "reward/mean": float(scores.float().mean()),
        "reward/greedy_mean": float(greedy_scores.float().mean()),
        "reward/advantage_mean": float(shaped.mean()),
        "actor/ref_kl": float(kl.sum(-1).mean()),
        "response_length/mean": float(m.sum(-1).mean()),
    }
    return adv, metrics
