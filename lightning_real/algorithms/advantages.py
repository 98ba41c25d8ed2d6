"""Advantage estimators behind one entry point, :func:`compute_advantages`.

Every estimator takes the batch's scores ``[B]`` (one per sequence) and the action mask ``[B, T]``
(shapes of :mod:`lightning_real.algorithms.ppo`) and returns per-token ``(advantages, returns)``,
both ``[B, T]`` and zero off the mask. The group estimators expect the ``n = group_size``
responses of each prompt in consecutive rows (as :func:`~lightning_real.algorithms.grpo.group_advantages`).
Statistics (group baselines, batch whitening) are over the rows given: call them on the whole
global batch.

============================== =========================================================== =======
name                           advantage of response ``i`` (token ``t``)                   critic
============================== =========================================================== =======
``gae``                        GAE over KL-shaped token rewards, whitened (PPO)             yes
``grpo``                       ``(r_i - mean_g) / (std_g + eps)``, or ``r_i - mean_g``      no
                               with ``scale_by_std=False`` (Dr. GRPO)
``grpo_passk``                 the group's best response ``r_best - r_second``, others 0    no
                               (Chen et al. 2025, Pass@k training; verl's ``grpo_passk``)
``rloo``                       ``r_i - mean_{j != i} r_j`` (Ahmadian et al. 2024)           no
``reinforce_plus_plus``        discounted return of ``-kl_coef KL_t`` + score at the end,   no
                               whitened over the batch's response tokens (Hu 2025)
``reinforce_plus_plus_baseline`` as ``reinforce_plus_plus`` on ``r_i - mean_g``               no
``remax``                      return-to-go of the score minus the greedy response's score  no
============================== =========================================================== =======

REINFORCE++ follows OpenRLHF's ``reinforce`` and ``reinforce_baseline`` estimators: the KL
penalty sits in the token rewards, returns are discounted sums over the response, and the
returns are whitened (mean 0, population std 1) over every response token of the batch.
``grpo``, ``grpo_passk`` and ``rloo`` give one number per sequence on all its tokens; their KL
term belongs in the loss (:class:`~lightning_real.algorithms.policy.PolicyLossConfig`'s
``use_kl_loss``), so they take no ``kl_coef``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_real.algorithms.masked import masked_whiten
from lightning_real.algorithms.ppo import KL_LOSS_ESTIMATORS, KLLossEstimator, compute_gae, token_rewards
from lightning_real.algorithms.remax import remax_advantages

AdvEstimator = Literal[
    "gae",
    "grpo",
    "grpo_passk",
    "rloo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
]
ADV_ESTIMATORS: tuple[str, ...] = (
    "gae",
    "grpo",
    "grpo_passk",
    "rloo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
)
GROUP_ESTIMATORS: tuple[str, ...] = ("grpo", "grpo_passk", "rloo", "reinforce_plus_plus_baseline")
"""Estimators whose baseline is the other responses of the same prompt (need group_size >= 2)."""
KL_IN_REWARD_ESTIMATORS: tuple[str, ...] = (
    "gae",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "remax",
)
"""Estimators that can put a KL penalty in the token rewards (kl_coef)."""


@dataclass(frozen=True)
class AdvantageConfig:
    """Which advantage estimator, and its settings."""

    estimator: AdvEstimator = "grpo"
    """One of ADV_ESTIMATORS (see the module doc)."""
    group_size: int = 1
    """Responses per prompt in consecutive rows; >= 2 for the group estimators."""
    gamma: float = 1.0
    """Discount of 'gae' and 'reinforce_plus_plus'; the other estimators need 1.0."""
    lam: float = 0.95
    """GAE lambda ('gae' only)."""
    kl_coef: float = 0.0
    """KL penalty in the token rewards ('gae', 'reinforce_plus_plus*', 'remax'); must be 0 for the
    others (put the KL in the loss instead)."""
    kl_estimator: KLLossEstimator = "k1"
    """Per-token KL estimate of the reward penalty: 'k1', 'k2', 'k3' or 'low_var_kl'."""
    scale_by_std: bool = True
    """'grpo' and 'grpo_passk': divide by the group's (unbiased) std; False: Dr. GRPO's mean baseline."""
    eps: float = 1e-4
    """Added to the group std of 'grpo' and 'grpo_passk' (a group of equal scores gets 0)."""
    whiten: bool = True
    """'gae' and 'reinforce_plus_plus*': whiten over the batch's response tokens (mean 0, std 1)."""

    def __post_init__(self) -> None:
        if self.estimator not in ADV_ESTIMATORS:
            raise ValueError(
                f"AdvantageConfig.estimator={self.estimator!r}; allowed: {', '.join(ADV_ESTIMATORS)}"
            )
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"AdvantageConfig.group_size={self.group_size!r}; allowed: an integer >= 1")
        if self.estimator in GROUP_ESTIMATORS and self.group_size < 2:
            raise ValueError(
                f"AdvantageConfig.group_size={self.group_size} with estimator={self.estimator!r}; "
                "allowed: an integer >= 2 (the baseline is the other responses of the prompt)"
            )
        for f in ("gamma", "lam"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
                raise ValueError(f"AdvantageConfig.{f}={v!r}; allowed: a number in [0, 1]")
        if self.gamma != 1.0 and self.estimator not in ("gae", "reinforce_plus_plus"):
            raise ValueError(
                f"AdvantageConfig.gamma={self.gamma!r} with estimator={self.estimator!r}; "
                "allowed: 1.0 (only 'gae' and 'reinforce_plus_plus' discount)"
            )
        for f in ("kl_coef", "eps"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or v < 0:
                raise ValueError(f"AdvantageConfig.{f}={v!r}; allowed: a number >= 0")
        if self.kl_coef and self.estimator not in KL_IN_REWARD_ESTIMATORS:
            raise ValueError(
                f"AdvantageConfig.kl_coef={self.kl_coef!r} with estimator={self.estimator!r}; allowed: 0 "
                f"(a KL penalty in the reward only for {', '.join(KL_IN_REWARD_ESTIMATORS)}; "
                "use the KL loss instead)"
            )
        if self.kl_estimator not in KL_LOSS_ESTIMATORS:
            raise ValueError(
                f"AdvantageConfig.kl_estimator={self.kl_estimator!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}"
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


def _groups(scores: torch.Tensor, group_size: int, name: str) -> torch.Tensor:
    s = scores.float()
    if s.dim() != 1 or s.numel() % group_size or group_size < 2:
        raise ValueError(
            f"{name}: scores of shape {tuple(s.shape)} do not split into groups of {group_size} (>= 2)"
        )
    return s.view(-1, group_size)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Leave-one-out baseline ``r_i - (sum_g - r_i) / (n - 1)`` per sequence ``[B]``."""
    g = _groups(scores, group_size, "rloo_advantages")
    baseline = (g.sum(-1, keepdim=True) - g) / (group_size - 1)
    return (g - baseline).reshape(-1)


def passk_advantages(
    scores: torch.Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """Pass@k advantage per sequence ``[B]``: each group's best response gets ``r_best - r_second``
    (divided by the group's unbiased std + eps when ``scale_by_std``), every other response 0.

    With ties for the best the first of them is "best", and its advantage is 0 anyway.
    """
    g = _groups(scores, group_size, "passk_advantages")
    top = torch.topk(g, 2, dim=-1).values
    gap = top[:, 0] - top[:, 1]
    if scale_by_std:
        gap = gap / (g.std(-1) + eps)
    adv = torch.zeros_like(g)
    adv.scatter_(-1, g.argmax(-1, keepdim=True), gap.unsqueeze(-1))
    return adv.reshape(-1)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_next`` over each row's masked actions (``next``: the next masked one),
    ``[B, T]``, zero off the mask; entries off the mask are skipped, so any padding works."""
    m = mask.bool()
    r = rewards.float()
    b, t = r.shape
    nxt = torch.zeros(b, dtype=r.dtype, device=r.device)
    out = torch.zeros_like(r)
    for i in range(t - 1, -1, -1):
        g = r[:, i] + gamma * nxt
        out[:, i] = torch.where(m[:, i], g, torch.zeros_like(g))
        nxt = torch.where(m[:, i], g, nxt)
    return out


def reinforce_pp_advantages(
    scores: torch.Tensor,
    mask: torch.Tensor,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: KLLossEstimator = "k1",
    gamma: float = 1.0,
    group_size: int | None = None,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ ``(advantages, returns)`` ``[B, T]``.

    Token rewards are ``-kl_coef * KL_t`` plus the score on each row's last action
    (:func:`~lightning_real.algorithms.ppo.token_rewards`); returns are their discounted sums
    (:func:`discounted_returns`); advantages are the returns whitened over every masked token of
    the batch. With ``group_size`` (the baseline variant) each score first has its group's mean
    subtracted. Without ``logp``/``ref_logp`` there is no KL term.
    """
    s = scores.float()
    if group_size is not None:
        g = _groups(s, group_size, "reinforce_pp_advantages")
        s = (g - g.mean(-1, keepdim=True)).reshape(-1)
    m = mask.float()
    if logp is None or ref_logp is None:
        logp = ref_logp = torch.zeros_like(m)
    rewards, _ = token_rewards(s, logp, ref_logp, mask, kl_coef, kl_estimator)
    returns = discounted_returns(rewards, mask, gamma)
    adv = masked_whiten(returns, mask) if whiten else returns
    return adv, returns


def compute_advantages(
    cfg: AdvantageConfig,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    values: torch.Tensor | None = None,
    bootstrap: torch.Tensor | None = None,
    logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    greedy_scores: torch.Tensor | None = None,
    kl_coef: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` ``[B, T]`` of ``cfg.estimator`` (see the module doc).

    ``values`` (``[B, T]`` action values) and ``bootstrap`` (``[B]``, see
    :func:`~lightning_real.algorithms.ppo.split_values`) are for 'gae', whose returns are the
    critic's targets; ``greedy_scores`` ``[B]`` for 'remax'; ``logp``/``ref_logp`` (old policy
    and reference log-probs) for a KL penalty in the reward, with ``kl_coef`` overriding
    ``cfg.kl_coef`` (an adaptive controller's value). For the sequence-level estimators the
    returns equal the advantages.
    """
    est = cfg.estimator
    coef = cfg.kl_coef if kl_coef is None else float(kl_coef)
    if coef and est not in KL_IN_REWARD_ESTIMATORS:
        raise ValueError(f"kl_coef={coef!r} with estimator={est!r}; allowed: 0 (use the KL loss)")
    m = mask.float()
    if est in ("grpo", "grpo_passk", "rloo"):
        if est == "grpo":
            seq = group_advantages(scores, cfg.group_size, cfg.scale_by_std, cfg.eps)
        elif est == "grpo_passk":
            seq = passk_advantages(scores, cfg.group_size, cfg.scale_by_std, cfg.eps)
        else:
            seq = rloo_advantages(scores, cfg.group_size)
        adv = seq.unsqueeze(-1) * m
        return adv, adv
    if est in ("reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        group = cfg.group_size if est == "reinforce_plus_plus_baseline" else None
        return reinforce_pp_advantages(
            scores, mask, logp, ref_logp, coef, cfg.kl_estimator, cfg.gamma, group, cfg.whiten
        )
    if est == "remax":
        if greedy_scores is None:
            raise ValueError("estimator='remax' needs greedy_scores, the scores of the greedy responses")
        adv, _ = remax_advantages(scores, greedy_scores, mask, logp, ref_logp, coef, cfg.kl_estimator)
        return adv, adv
    # gae
    if values is None:
        raise ValueError("estimator='gae' needs values, the critic's action values [B, T]")
    if logp is None or ref_logp is None:
        logp = ref_logp = torch.zeros_like(m)
    rewards, _ = token_rewards(scores, logp, ref_logp, mask, coef, cfg.kl_estimator)
    adv, ret = compute_gae(rewards, values * m, mask, cfg.gamma, cfg.lam, bootstrap)
    if cfg.whiten:
        adv = masked_whiten(adv, mask)
    return adv, ret
