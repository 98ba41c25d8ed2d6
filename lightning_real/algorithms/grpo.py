"""GRPO (Shao et al., DeepSeekMath 2024) and the algorithms that share its graph.

Each prompt's ``G`` responses sit in consecutive rows. A response's advantage is its score
minus its group's mean, divided by the group's standard deviation (unbiased, as TRL computes
it), the same for all its tokens. The loss is PPO's clipped surrogate plus ``beta`` times the
k3 estimate of KL(policy || reference) per token, averaged over each response's tokens and then
over responses (DeepSeekMath's ``1/G sum_i 1/|o_i| sum_t``). Shapes follow
:mod:`lightning_real.algorithms.ppo`.

:class:`GRPOConfig` also describes the algorithms that differ from GRPO only in the advantage
estimator, the policy loss or the sampling (:data:`PRESETS`): RLOO and REINFORCE++
(``adv_estimator``, :mod:`lightning_real.algorithms.advantages`), GSPO (``policy_loss='gspo'``),
DAPO (clip-higher, token-mean, dynamic sampling and overlong shaping,
:mod:`lightning_real.algorithms.dapo`) and Dr. GRPO (``scale_by_std=False`` with
``loss_agg='seq-mean-token-sum-norm'``). :meth:`GRPOConfig.advantage_config`,
:meth:`GRPOConfig.policy_config` and :meth:`GRPOConfig.dapo_config` hand the settings to the
pure functions; :func:`grpo_loss` is
:func:`lightning_real.algorithms.policy.combined_policy_loss` under ``policy_config()``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from lightning_real.algorithms.advantages import GROUP_ESTIMATORS, AdvantageConfig

# GRPO's own estimator lives with the others; it is also importable from here.
from lightning_real.algorithms.advantages import group_advantages as group_advantages
from lightning_real.algorithms.aggregation import LOSS_AGG_MODES, LossAgg
from lightning_real.algorithms.dapo import DAPOConfig
from lightning_real.algorithms.masked import Reduction
from lightning_real.algorithms.policy import POLICY_LOSSES, PolicyLossConfig, combined_policy_loss
from lightning_real.algorithms.ppo import KL_LOSS_ESTIMATORS, KLLossEstimator

LOSS_AGGS: tuple[str, ...] = LOSS_AGG_MODES
"""Aggregation modes of the GRPO loss (all of :mod:`lightning_real.algorithms.aggregation`)."""
GroupEstimator = Literal["grpo", "grpo_passk", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"]
GRPO_ESTIMATORS: tuple[str, ...] = (
    "grpo",
    "grpo_passk",
    "rloo",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
)
"""The critic-free estimators of :func:`~lightning_real.algorithms.advantages.compute_advantages`."""
REWARD_KL_ESTIMATORS: tuple[str, ...] = ("reinforce_plus_plus", "reinforce_plus_plus_baseline")
"""Estimators that take a KL penalty in the token rewards (``reward_kl_coef``)."""


@dataclass(frozen=True)
class GRPOConfig:
    """Hyper-parameters of GRPO and the algorithms that share its graph (RLOO, REINFORCE++, GSPO,
    DAPO, Dr. GRPO). Defaults follow DeepSeekMath and TRL; :data:`PRESETS` holds the other
    algorithms' settings. Names follow verl where verl has one (``adv_estimator``, ``policy_loss``,
    ``clip_eps_high`` for ``clip_ratio_high``, ``dual_clip`` for ``clip_ratio_c``)."""

    group_size: int = 8
    """Responses sampled per prompt (G, verl's rollout.n); 1 only for 'reinforce_plus_plus'."""
    clip_eps: float = 0.2
    """Lower policy ratio clip, 1 - clip_eps (and the upper one unless clip_eps_high is set)."""
    kl_coef: float = 0.04
    """Weight of the KL loss against the reference model (verl's kl_loss_coef); 0 drops the KL
    loss, and the reference model when reward_kl_coef is 0 too."""
    scale_by_std: bool = True
    """'grpo' and 'grpo_passk': divide by the group's std; False keeps only the mean baseline (Dr. GRPO)."""
    eps: float = 1e-4
    """Added to the group std so a group of equal scores gets advantage 0, not NaN."""
    loss_agg: LossAgg = "seq-mean-token-mean"
    """verl's loss_agg_mode: 'seq-mean-token-mean' (mean over each response's tokens, then over
    responses: the paper), 'token-mean' (one mean over all tokens: DAPO), 'seq-mean-token-sum',
    or 'seq-mean-token-sum-norm' (token sums over a constant length: Dr. GRPO)."""
    minibatches: int = 1
    """Optimizer steps per iteration, each on a 1/minibatches share of the batch (1: on-policy)."""
    adv_estimator: GroupEstimator = "grpo"
    """verl's adv_estimator: 'grpo', 'grpo_passk' (only each group's best response is pushed up),
    'rloo' (leave-one-out mean), 'reinforce_plus_plus' (discounted returns whitened over the
    batch) or 'reinforce_plus_plus_baseline' (the same after subtracting the group mean)."""
    policy_loss: Literal["vanilla", "gspo"] = "vanilla"
    """'vanilla': PPO's per-token clipped ratio; 'gspo': GSPO's sequence-level ratio (use clip
    ranges near 3e-4 / 4e-4)."""
    clip_eps_high: float | None = None
    """Upper ratio clip, 1 + clip_eps_high (DAPO's clip-higher: 0.28); null: clip_eps."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative advantages (e.g. 3.0); null: off. Only
    with policy_loss 'vanilla'."""
    kl_estimator: KLLossEstimator = "k3"
    """KL estimate of the KL loss: 'k1', 'k2', 'k3' (GRPO's) or 'low_var_kl' (k3 clamped to
    [-10, 10], verl's default)."""
    reward_kl_coef: float = 0.0
    """KL penalty in the token rewards ('reinforce_plus_plus*' only, OpenRLHF's init_kl_coef)."""
    reward_kl_estimator: KLLossEstimator = "k1"
    """KL estimate of the reward penalty: 'k1', 'k2', 'k3' or 'low_var_kl'."""
    gamma: float = 1.0
    """Discount of 'reinforce_plus_plus' returns; 1.0 for every other estimator."""
    loss_agg_len: int | None = None
    """The constant length 'seq-mean-token-sum-norm' divides by; null: generation.max_new_tokens."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    tis_cap: float | None = None
    """Truncated importance sampling: weight each token's loss by min(pi_train / pi_rollout, cap),
    the ratio of the training model's log-probs (an extra actor forward, actor_inf) to the
    rollout engine's (Yao et al.: 2.0); null: off."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: drop groups whose scores are all equal and generate more prompts
    until the batch is full (needs a rule reward; see docs/rlhf.md)."""
    max_gen_rounds: int = 3
    """Generation rounds per iteration under dynamic sampling; the data module gives
    batch_size x max_gen_rounds prompts, one batch per round."""
    overlong_buffer: int = 0
    """DAPO's overlong shaping: over the last overlong_buffer tokens before
    generation.max_new_tokens the score loses up to overlong_factor, and a response without EOS
    loses overlong_factor; 0: off."""
    overlong_factor: float = 1.0
    """Largest overlong penalty."""

    def __post_init__(self) -> None:
        if self.adv_estimator not in GRPO_ESTIMATORS:
            raise ValueError(
                f"GRPOConfig.adv_estimator={self.adv_estimator!r}; allowed: {', '.join(GRPO_ESTIMATORS)}"
            )
        grouped = self.adv_estimator in GROUP_ESTIMATORS or self.dynamic_sampling
        low = 2 if grouped else 1
        if not _integer(self.group_size) or self.group_size < low:
            why = "" if low == 1 else f" with adv_estimator={self.adv_estimator!r}"
            why += " and dynamic_sampling" if self.dynamic_sampling and low == 2 else ""
            raise ValueError(
                f"GRPOConfig.group_size={self.group_size!r}; allowed: an integer >= {low}{why} "
                "(the baseline is the other responses of the prompt)"
                if low == 2
                else f"GRPOConfig.group_size={self.group_size!r}; allowed: an integer >= 1"
            )
        for f in ("clip_eps", "kl_coef", "eps", "reward_kl_coef", "entropy_coef", "overlong_factor"):
            v = getattr(self, f)
            if not _number(v) or v < 0:
                raise ValueError(f"GRPOConfig.{f}={v!r}; allowed: a number >= 0")
        for f in ("clip_eps_high", "tis_cap"):
            v = getattr(self, f)
            if v is not None and (not _number(v) or v <= 0):
                raise ValueError(f"GRPOConfig.{f}={v!r}; allowed: a number > 0 or null")
        if self.dual_clip is not None and (not _number(self.dual_clip) or self.dual_clip <= 1):
            raise ValueError(f"GRPOConfig.dual_clip={self.dual_clip!r}; allowed: a number > 1 or null")
        if self.policy_loss not in POLICY_LOSSES:
            raise ValueError(
                f"GRPOConfig.policy_loss={self.policy_loss!r}; allowed: {', '.join(POLICY_LOSSES)}"
            )
        if self.dual_clip is not None and self.policy_loss != "vanilla":
            raise ValueError(
                f"GRPOConfig.dual_clip={self.dual_clip!r}; allowed: null with policy_loss={self.policy_loss!r}"
            )
        for f in ("minibatches", "max_gen_rounds"):
            v = getattr(self, f)
            if not _integer(v) or v < 1:
                raise ValueError(f"GRPOConfig.{f}={v!r}; allowed: an integer >= 1")
        if not _integer(self.overlong_buffer) or self.overlong_buffer < 0:
            raise ValueError(f"GRPOConfig.overlong_buffer={self.overlong_buffer!r}; allowed: an integer >= 0")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"GRPOConfig.loss_agg={self.loss_agg!r}; allowed: {', '.join(LOSS_AGGS)}")
        if self.loss_agg_len is not None and (not _integer(self.loss_agg_len) or self.loss_agg_len < 1):
            raise ValueError(
                f"GRPOConfig.loss_agg_len={self.loss_agg_len!r}; allowed: an integer >= 1 or null"
            )
        for f in ("kl_estimator", "reward_kl_estimator"):
            v = getattr(self, f)
            if v not in KL_LOSS_ESTIMATORS:
                raise ValueError(f"GRPOConfig.{f}={v!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}")
        if self.reward_kl_coef and self.adv_estimator not in REWARD_KL_ESTIMATORS:
            raise ValueError(
                f"GRPOConfig.reward_kl_coef={self.reward_kl_coef!r}; allowed: 0 with "
                f"adv_estimator={self.adv_estimator!r} (a KL penalty in the reward only for "
                f"{', '.join(REWARD_KL_ESTIMATORS)}; use kl_coef, the KL loss, instead)"
            )
        if not _number(self.gamma) or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"GRPOConfig.gamma={self.gamma!r}; allowed: a number in [0, 1]")
        if self.gamma != 1.0 and self.adv_estimator != "reinforce_plus_plus":
            raise ValueError(
                f"GRPOConfig.gamma={self.gamma!r}; allowed: 1.0 with adv_estimator={self.adv_estimator!r} "
                "(only 'reinforce_plus_plus' discounts)"
            )

    @classmethod
    def preset(cls, algorithm: str, **overrides: Any) -> GRPOConfig:
        """The settings of ``algorithm`` (a name of :data:`PRESETS`), with ``overrides``."""
        if algorithm not in PRESETS:
            raise ValueError(f"GRPOConfig.preset({algorithm!r}); allowed: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[algorithm], **overrides})

    @property
    def use_ref(self) -> bool:
        """Whether the reference model runs (a KL loss or a KL penalty in the reward)."""
        return self.kl_coef > 0 or self.reward_kl_coef > 0

    @property
    def prompt_rounds(self) -> int:
        """Batches of prompts one iteration reads: max_gen_rounds under dynamic sampling, else 1."""
        return self.max_gen_rounds if self.dynamic_sampling else 1

    def advantage_config(self) -> AdvantageConfig:
        """The advantage estimator these settings describe."""
        return AdvantageConfig(
            estimator=self.adv_estimator,
            group_size=self.group_size,
            gamma=self.gamma,
            kl_coef=self.reward_kl_coef,
            kl_estimator=self.reward_kl_estimator,
            scale_by_std=self.scale_by_std,
            eps=self.eps,
        )

    def policy_config(self, gen_len: int | None = None) -> PolicyLossConfig:
        """The actor loss these settings describe (a KL loss when kl_coef > 0).

        ``gen_len`` is the constant length of 'seq-mean-token-sum-norm' when ``loss_agg_len`` is
        unset (the generation's ``max_new_tokens``).
        """
        return PolicyLossConfig(
            policy_loss=self.policy_loss,
            clip_eps=self.clip_eps,
            clip_eps_high=self.clip_eps_high,
            dual_clip=self.dual_clip,
            loss_agg=self.loss_agg,
            loss_agg_len=self.loss_agg_len if self.loss_agg_len is not None else gen_len,
            use_kl_loss=self.kl_coef > 0,
            kl_loss_coef=self.kl_coef,
            kl_loss_estimator=self.kl_estimator,
            entropy_coef=self.entropy_coef,
            tis_cap=self.tis_cap,
        )

    def dapo_config(self, gen_len: int) -> DAPOConfig:
        """Dynamic sampling and overlong shaping, with ``gen_len`` (max_new_tokens) as L_max."""
        if self.overlong_buffer > gen_len:
            raise ValueError(
                f"GRPOConfig.overlong_buffer={self.overlong_buffer}; allowed: an integer in "
                f"[0, generation.max_new_tokens={gen_len}]"
            )
        return DAPOConfig(
            dynamic_sampling=self.dynamic_sampling,
            max_gen_rounds=self.max_gen_rounds,
            overlong_max_len=gen_len if self.overlong_buffer else None,
            overlong_cache=self.overlong_buffer,
            overlong_factor=self.overlong_factor,
        )


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": {},
    "rloo": {"adv_estimator": "rloo"},
    "reinforce_pp": {
        "adv_estimator": "reinforce_plus_plus",
        "group_size": 1,
        "kl_coef": 0.0,
        "reward_kl_coef": 0.01,
        "loss_agg": "token-mean",
    },
    "reinforce_pp_baseline": {
        "adv_estimator": "reinforce_plus_plus_baseline",
        "kl_coef": 0.0,
        "reward_kl_coef": 0.01,
        "loss_agg": "token-mean",
    },
    "gspo": {
        "policy_loss": "gspo",
        "clip_eps": 3e-4,
        "clip_eps_high": 4e-4,
        "loss_agg": "seq-mean-token-mean",
        "kl_coef": 0.0,
    },
    "dapo": {
        "clip_eps_high": 0.28,
        "loss_agg": "token-mean",
        "kl_coef": 0.0,
        "dynamic_sampling": True,
    },
    "dr_grpo": {"scale_by_std": False, "loss_agg": "seq-mean-token-sum-norm", "kl_coef": 0.0},
}
"""Settings of each algorithm that runs on GRPO's graph, over :class:`GRPOConfig`'s defaults:
RLOO (Ahmadian et al. 2024), REINFORCE++ and its group-baseline variant (OpenRLHF's reinforce and
reinforce_baseline: KL in the reward, token-mean), GSPO (Zheng et al. 2025: sequence ratio,
clip 3e-4/4e-4, no KL), DAPO (Yu et al. 2025: clip-higher 0.28, token-mean, dynamic sampling, no
KL; overlong shaping is set per recipe, as it depends on the length limit) and Dr. GRPO (Liu et
al. 2025: no std scaling, a constant normaliser, no KL)."""


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: GRPOConfig,
    reduction: Reduction = "mean",
    gen_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate plus ``kl_coef`` x the KL estimate per token, aggregated as ``cfg.loss_agg``.

    ``advantages`` is ``[B]`` (one per sequence) or ``[B, T]``. With ``reduction="sum"`` the
    result is the numerator of ``cfg.loss_agg`` (for 'seq-mean-token-mean' the sum over
    sequences of their token means; for 'token-mean' the masked token sum): divide by the number
    of sequences, or of tokens for 'token-mean'. Without ``ref_logp`` (or with ``kl_coef=0``) the
    KL term is dropped and ``actor/kl_loss`` is 0. ``gen_len`` as :meth:`GRPOConfig.policy_config`.
    """
    pcfg = cfg.policy_config(gen_len)
    if ref_logp is None:
        pcfg = replace(pcfg, use_kl_loss=False)
    loss, metrics = combined_policy_loss(
        logp, old_logp, advantages, mask, pcfg, ref_logp, reduction=reduction
    )
    if "actor/kl_loss" not in metrics:
        metrics["actor/kl_loss"] = torch.zeros_like(loss.detach())
    return loss, metrics


def grpo_metrics(scores: torch.Tensor, group_size: int, mask: torch.Tensor) -> dict[str, float]:
    """Batch statistics: reward/mean, response_length/mean and, for groups of 2 or more, the
    mean group std and the share of groups whose scores are all equal (no signal)."""
    g = scores.float().view(-1, group_size)
    out = {
        "reward/mean": float(g.mean()),
        "response_length/mean": float(mask.float().sum(-1).mean()),
    }
    if group_size > 1:
        out["reward/group_std"] = float(g.std(-1).mean())
        out["reward/zero_std_frac"] = float((g.std(-1) == 0).float().mean())
    return out
