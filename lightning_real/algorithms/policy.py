"""The actor loss of the critic-free and PPO-style algorithms, assembled from its parts.

``loss = aggregate(w_t * pg_t) + kl_loss_coef * aggregate(KL_t) - entropy_coef * aggregate(H_t)``

* ``pg_t``: the per-token policy-gradient loss, either PPO's clipped surrogate
  (:func:`lightning_real.algorithms.ppo.policy_loss`: symmetric clip, DAPO's clip-higher with
  ``clip_eps_high > clip_eps``, dual clip) or GSPO's sequence-ratio form
  (:func:`lightning_real.algorithms.gspo.gspo_loss`);
* ``w_t``: truncated importance weights between the rollout engine and the trainer
  (:mod:`lightning_real.algorithms.correction`), when ``tis_cap`` is set;
* ``KL_t``: a KL estimate against the reference model *in the loss* (GRPO, verl's
  ``use_kl_loss``), besides or instead of the KL penalty in the reward;
* ``aggregate``: ``loss_agg`` (:mod:`lightning_real.algorithms.aggregation`), the same for
  every term and every metric, so the engine's one normaliser serves them all.

Shapes follow :mod:`lightning_real.algorithms.ppo`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_real.algorithms.aggregation import LossAgg, agg_loss, agg_packable, check_loss_agg
from lightning_real.algorithms.correction import tis_metrics, tis_weights
from lightning_real.algorithms.gspo import GSPO_CLIP_EPS, GSPO_CLIP_EPS_HIGH, gspo_loss
from lightning_real.algorithms.masked import Reduction
from lightning_real.algorithms.ppo import (
    KL_LOSS_ESTIMATORS,
    KLLossEstimator,
    PPOConfig,
    kl_per_token,
    policy_loss,
)

POLICY_LOSSES: tuple[str, ...] = ("vanilla", "gspo")


@dataclass(frozen=True)
class PolicyLossConfig:
    """What the actor loss is made of (names follow verl's actor config)."""

    policy_loss: Literal["vanilla", "gspo"] = "vanilla"
    """'vanilla': PPO's per-token clipped ratio; 'gspo': GSPO's sequence-level ratio (use
    :meth:`gspo` for the paper's clip range)."""
    clip_eps: float = 0.2
    """Lower ratio clip: the ratio is kept above 1 - clip_eps (verl's clip_ratio_low)."""
    clip_eps_high: float | None = None
    """Upper ratio clip, 1 + clip_eps_high (DAPO's clip-higher uses 0.28); None: clip_eps."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative advantages (verl's clip_ratio_c, e.g. 3.0);
    None: off. Only for policy_loss='vanilla'."""
    loss_agg: LossAgg = "token-mean"
    """How token losses are aggregated: 'token-mean', 'seq-mean-token-mean', 'seq-mean-token-sum'
    or 'seq-mean-token-sum-norm' (see lightning_real.algorithms.aggregation)."""
    loss_agg_len: int | None = None
    """The constant length 'seq-mean-token-sum-norm' divides by (e.g. max_new_tokens)."""
    use_kl_loss: bool = False
    """Add kl_loss_coef times the KL estimate against the reference to the loss (needs ref_logp)."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss (verl's default)."""
    kl_loss_estimator: KLLossEstimator = "low_var_kl"
    """KL estimate of the KL loss: 'k1', 'k2', 'k3' or 'low_var_kl' (k3 clamped to [-10, 10])."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    tis_cap: float | None = None
    """Truncated importance sampling cap C on exp(old_logp - rollout_logp) (Yao et al.: 2.0);
    None: off. Needs the rollout engine's log-probs."""

    def __post_init__(self) -> None:
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(
                f"PolicyLossConfig.policy_loss={self.policy_loss!r}; allowed: {', '.join(POLICY_LOSSES)}"
            )
        if not _number(self.clip_eps) or self.clip_eps < 0:
            raise ValueError(f"PolicyLossConfig.clip_eps={self.clip_eps!r}; allowed: a number >= 0")
        for f in ("clip_eps_high", "tis_cap"):
            v = getattr(self, f)
            if v is not None and (not _number(v) or v <= 0):
                raise ValueError(f"PolicyLossConfig.{f}={v!r}; allowed: a number > 0 or None")
        if self.dual_clip is not None and (not _number(self.dual_clip) or self.dual_clip <= 1):
            raise ValueError(f"PolicyLossConfig.dual_clip={self.dual_clip!r}; allowed: a number > 1 or None")
        if self.dual_clip is not None and self.policy_loss != "vanilla":
            raise ValueError(
                f"PolicyLossConfig.dual_clip={self.dual_clip!r} with policy_loss={self.policy_loss!r}; "
                "allowed: dual_clip=None unless policy_loss='vanilla'"
            )
        check_loss_agg(self.loss_agg, self.loss_agg_len, "PolicyLossConfig.loss_agg")
        for f in ("kl_loss_coef", "entropy_coef"):
            v = getattr(self, f)
            if not _number(v) or v < 0:
                raise ValueError(f"PolicyLossConfig.{f}={v!r}; allowed: a number >= 0")
        if self.kl_loss_estimator not in KL_LOSS_ESTIMATORS:
            raise ValueError(
                f"PolicyLossConfig.kl_loss_estimator={self.kl_loss_estimator!r}; "
                f"allowed: {', '.join(KL_LOSS_ESTIMATORS)}"
            )

    @classmethod
    def gspo(cls, **overrides: Any) -> PolicyLossConfig:
        """GSPO with the paper's settings: clip range 3e-4 / 4e-4, 'seq-mean-token-mean'."""
        base: dict[str, Any] = {
            "policy_loss": "gspo",
            "clip_eps": GSPO_CLIP_EPS,
            "clip_eps_high": GSPO_CLIP_EPS_HIGH,
            "loss_agg": "seq-mean-token-mean",
        }
        return cls(**{**base, **overrides})

    @property
    def packable(self) -> bool:
        """Whether the loss is a sum over tokens, which packed rows keep: not under
        'seq-mean-token-mean' nor GSPO's sequence-level ratio (``Training.packable``)."""
        return self.policy_loss == "vanilla" and agg_packable(self.loss_agg)

    @classmethod
    def from_ppo(cls, cfg: PPOConfig, gen_len: int) -> PolicyLossConfig:
        """The actor loss of PPO and ReMax under ``cfg`` (``gen_len``: the length of
        'seq-mean-token-sum-norm' when ``cfg.loss_agg_len`` is unset)."""
        return cls(
            clip_eps=cfg.clip_eps,
            clip_eps_high=cfg.clip_eps_high,
            dual_clip=cfg.dual_clip,
            loss_agg=cfg.loss_agg,
            loss_agg_len=cfg.agg_len(gen_len),
            use_kl_loss=cfg.use_kl_loss,
            kl_loss_coef=cfg.kl_loss_coef,
            kl_loss_estimator=cfg.kl_loss_estimator,
            entropy_coef=cfg.entropy_coef,
        )


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def kl_loss(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    estimator: KLLossEstimator = "low_var_kl",
    reduction: Reduction = "mean",
    loss_agg: LossAgg = "token-mean",
    loss_agg_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(policy || reference) estimate per token (:func:`~lightning_real.algorithms.ppo.kl_per_token`),
    aggregated as ``loss_agg``; gradients flow through ``logp``. Metric: ``actor/kl_loss``."""
    kl = kl_per_token(logp.float(), ref_logp.float(), estimator)
    loss = agg_loss(kl, mask, loss_agg, reduction, loss_agg_len)
    return loss, {"actor/kl_loss": loss.detach()}


def combined_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    reduction: Reduction = "sum",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor loss under ``cfg`` (see the module doc) and its metrics.

    ``advantages`` is ``[B]`` or ``[B, T]``. ``ref_logp`` is required with ``use_kl_loss``,
    ``rollout_logp`` with ``tis_cap``. With ``reduction="sum"`` the loss and every metric are
    numerators for the normaliser :func:`~lightning_real.algorithms.aggregation.agg_norm_key`
    gives for ``cfg.loss_agg``. Metrics: those of the policy loss, plus ``actor/kl_loss`` (with
    ``use_kl_loss``), ``actor/entropy`` (when ``entropy`` is given) and ``actor/tis_*`` (with
    ``tis_cap``).
    """
    weights = None
    if cfg.tis_cap is not None:
        if rollout_logp is None:
            raise ValueError(
                f"PolicyLossConfig.tis_cap={cfg.tis_cap!r} needs rollout_logp, the rollout engine's "
                "log-probs of the sampled tokens; give them or set tis_cap=None"
            )
        weights = tis_weights(old_logp, rollout_logp, cfg.tis_cap)
    if cfg.policy_loss == "gspo":
        loss, metrics = gspo_loss(
            logp,
            old_logp,
            advantages,
            mask,
            cfg.clip_eps,
            cfg.clip_eps_high,
            reduction,
            weights=weights,
            loss_agg=cfg.loss_agg,
            loss_agg_len=cfg.loss_agg_len,
        )
    else:
        loss, metrics = policy_loss(
            logp,
            old_logp,
            advantages,
            mask,
            cfg.clip_eps,
            cfg.clip_eps_high,
            cfg.dual_clip,
            reduction,
            weights=weights,
            loss_agg=cfg.loss_agg,
            loss_agg_len=cfg.loss_agg_len,
        )
    if weights is not None:
        assert rollout_logp is not None and cfg.tis_cap is not None
        metrics.update(
            tis_metrics(old_logp, rollout_logp, mask, cfg.tis_cap, reduction, cfg.loss_agg, cfg.loss_agg_len)
        )
    if cfg.use_kl_loss:
        if ref_logp is None:
            raise ValueError(
                "PolicyLossConfig.use_kl_loss=True needs ref_logp, the reference model's log-probs; "
                "give them or set use_kl_loss=False"
            )
        kl, kl_m = kl_loss(
            logp, ref_logp, mask, cfg.kl_loss_estimator, reduction, cfg.loss_agg, cfg.loss_agg_len
        )
        loss = loss + cfg.kl_loss_coef * kl
        metrics.update(kl_m)
    if entropy is not None:
        ent = agg_loss(entropy.float(), mask, cfg.loss_agg, reduction, cfg.loss_agg_len)
        metrics["actor/entropy"] = ent.detach()
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * ent
    return loss, metrics
