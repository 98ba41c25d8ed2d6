"""PPO for language models: reward shaping, GAE, and the clipped actor and critic losses.

Tensor conventions (those of ``lightning_real.models.forward``): a sequence of ``S`` tokens has
``T = S - 1`` *actions*; action ``t`` emits token ``t + 1`` from the state that has read tokens
``0..t``. Log-probabilities are ``[B, T]``; values are ``[B, S]`` (entry ``t`` is the value after
reading tokens ``0..t``), so ``values[:, :-1]`` are the actions' state values and the entry after
a row's last action is the value of the state its response ends in (used to bootstrap a
truncated response). ``mask`` is ``[B, T]``: 1 on actions that generated response tokens (EOS
included), i.e. ``loss_mask[:, 1:]``.

Every function is pure torch and process-group free. Losses return ``(loss, metrics)``; with
``reduction="sum"`` both are masked sums, to be divided by the token count of the global batch
(what :class:`~lightning_real.models.train.TrainEngine` does), with ``"mean"`` masked means.
The policy and value losses also take ``loss_agg`` (see
:mod:`lightning_real.algorithms.aggregation`): with a mode other than the default 'token-mean'
the "sum" is divided by the number of sequences instead (``agg_norm_key``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lightning_real.algorithms.aggregation import LossAgg, agg_loss, check_loss_agg
from lightning_real.algorithms.masked import (
    Reduction,
    RunningMeanStd,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    reduce,
)

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")
KLLossEstimator = Literal["k1", "k2", "k3", "low_var_kl"]
KL_LOSS_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "low_var_kl")
"""Every estimate :func:`kl_per_token` computes: the choices of the KL loss (and of the reward
penalty outside PPOConfig, whose recipe key keeps k1, k2, k3)."""
LOW_VAR_KL_BOUND = 10.0
"""'low_var_kl' is k3 clamped to [-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND] (verl's bound)."""
TRUNCATIONS: tuple[str, ...] = ("bootstrap", "penalty")
REWARD_SCALINGS: tuple[str, ...] = ("none", "scale", "normalize")


@dataclass(frozen=True)
class PPOConfig:
    """PPO hyper-parameters (defaults follow OpenRLHF and TRL)."""

    clip_eps: float = 0.2
    """Policy ratio clip: the ratio is kept in [1 - clip_eps, 1 + clip_eps_high]."""
    clip_eps_high: float | None = None
    """Upper ratio clip; None uses clip_eps (symmetric clipping)."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on the loss of negative advantages (verl's clip_ratio_c, e.g. 3.0); None: off."""
    value_clip: float | None = 0.2
    """New values stay within this distance of the old ones in the clipped value loss; None: plain MSE."""
    gamma: float = 1.0
    """Discount factor of GAE."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """Coefficient of the per-token KL penalty against the reference model (initial value when adaptive)."""
    kl_estimator: KLEstimator = "k1"
    """Per-token KL estimate: 'k1' log-ratio, 'k2' half squared log-ratio, 'k3' exp(-r) - 1 + r."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target (Ziegler et al.'s controller, as TRL and OpenRLHF)."""
    kl_target: float = 6.0
    """Target KL per sequence of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in sequences) of the adaptive controller."""
    reward_clip: float | None = 10.0
    """Scores are clipped to [-reward_clip, reward_clip] after scaling; None: no clipping."""
    reward_scaling: Literal["none", "scale", "normalize"] = "none"
    """'scale' divides scores by their running std, 'normalize' also subtracts the running mean."""
    whiten_advantages: bool = True
    """Whiten advantages over the batch's response tokens (mean 0, std 1)."""
    truncation: Literal["bootstrap", "penalty"] = "bootstrap"
    """A response that reached the token limit without EOS: 'bootstrap' from the critic's value
    of its last state, or 'penalty': treat it as finished and add truncation_penalty to its score."""
    truncation_penalty: float = 0.0
    """Added to the score of a truncated response when truncation='penalty'."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus in the actor loss."""
    ppo_epochs: int = 1
    """Passes over each batch of experience."""
    minibatches: int = 1
    """Optimizer steps per pass (the batch is cut into this many minibatches)."""
    loss_agg: LossAgg = "token-mean"
    """verl's loss_agg_mode of the actor and critic losses: 'token-mean', 'seq-mean-token-mean',
    'seq-mean-token-sum' or 'seq-mean-token-sum-norm' (see lightning_real.algorithms.aggregation)."""
    loss_agg_len: int | None = None
    """The constant length 'seq-mean-token-sum-norm' divides by; null: generation.max_new_tokens."""
    use_kl_loss: bool = False
    """Add kl_loss_coef times a KL estimate against the reference to the actor loss, besides (or,
    with kl_coef 0, instead of) the KL penalty in the reward."""
    kl_loss_coef: float = 0.001
    """Weight of the KL loss (verl's default)."""
    kl_loss_estimator: KLLossEstimator = "low_var_kl"
    """KL estimate of the KL loss: 'k1', 'k2', 'k3' or 'low_var_kl' (k3 clamped to [-10, 10])."""

    def __post_init__(self) -> None:
        for f in ("clip_eps", "gamma", "lam", "kl_coef", "kl_target", "kl_loss_coef"):
            v = getattr(self, f)
            if not isinstance(v, int | float) or v < 0:
                raise ValueError(f"PPOConfig.{f}={v!r}; allowed: a number >= 0")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"PPOConfig: gamma={self.gamma}, lam={self.lam}; allowed: numbers in [0, 1]")
        for f in ("clip_eps_high", "value_clip", "reward_clip"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int | float) or v <= 0):
                raise ValueError(f"PPOConfig.{f}={v!r}; allowed: a number > 0 or None")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"PPOConfig.dual_clip={self.dual_clip!r}; allowed: a number > 1 or None")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(
                f"PPOConfig.kl_estimator={self.kl_estimator!r}; allowed: {', '.join(KL_ESTIMATORS)}"
            )
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"PPOConfig.truncation={self.truncation!r}; allowed: {', '.join(TRUNCATIONS)}")
        if self.reward_scaling not in REWARD_SCALINGS:
            raise ValueError(
                f"PPOConfig.reward_scaling={self.reward_scaling!r}; allowed: {', '.join(REWARD_SCALINGS)}"
            )
        for f in ("kl_horizon", "ppo_epochs", "minibatches"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PPOConfig.{f}={v!r}; allowed: an integer >= 1")
        check_loss_agg(self.loss_agg, self.loss_agg_len or 1, "PPOConfig.loss_agg")
        if self.loss_agg_len is not None and (
            not isinstance(self.loss_agg_len, int) or self.loss_agg_len < 1
        ):
            raise ValueError(
                f"PPOConfig.loss_agg_len={self.loss_agg_len!r}; allowed: an integer >= 1 or null"
            )
        if self.kl_loss_estimator not in KL_LOSS_ESTIMATORS:
            raise ValueError(
                f"PPOConfig.kl_loss_estimator={self.kl_loss_estimator!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}"
            )

    def agg_len(self, gen_len: int) -> int:
        """The constant length of 'seq-mean-token-sum-norm': loss_agg_len, else ``gen_len``."""
        return self.loss_agg_len if self.loss_agg_len is not None else gen_len


# ---- KL against the reference -----------------------------------------------------------------
def kl_per_token(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLLossEstimator = "k1"
) -> torch.Tensor:
    """Estimate of KL(policy || reference) at each sampled token (Schulman's k1, k2, k3).

    With ``r = logp - ref_logp``: 'k1' ``r``, 'k2' ``r^2 / 2``, 'k3' ``exp(-r) - 1 + r``, and
    'low_var_kl' (verl's name) k3 with ``r`` clamped to [-20, 20] and the result clamped to
    [-10, 10], so a token far off the reference adds at most 10 (and no gradient there).
    """
    r = logp - ref_logp
    if estimator == "k1":
        return r
    if estimator == "k2":
        return 0.5 * r**2
    if estimator == "k3":
        # exp(-r) - 1 + r: unbiased and never negative; clamp the exponent so one token cannot overflow.
        return torch.exp((-r).clamp(max=20.0)) - 1 + r
    if estimator == "low_var_kl":
        rc = r.clamp(-20.0, 20.0)
        return (torch.exp(-rc) - 1 + rc).clamp(-LOW_VAR_KL_BOUND, LOW_VAR_KL_BOUND)
    raise ValueError(f"kl estimator={estimator!r}; allowed: {', '.join(KL_LOSS_ESTIMATORS)}")


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing changes."""


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL approaches ``target``.

    ``value *= 1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon``: larger when the KL is
    above target, smaller below.

    Input convention: ``kl`` is the batch mean of each sequence's *summed* per-token KL estimate
    over its response tokens (``actor/ref_kl`` of :func:`ppo_experience`), and ``target`` is in
    the same unit (KL per sequence, 6.0 by default as in Ziegler et al.). This is what the
    original TRL ``PPOTrainer`` fed its controller (the mean over the batch of the per-sequence
    sum). OpenRLHF and verl use the same update rule but feed it the mean over the batch of each
    sequence's per-token *mean* KL (``masked_mean`` over the response tokens), so their
    ``target`` is a KL per token: a target taken from their configs must be multiplied by the
    typical response length to mean the same here.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon < 1:
            raise ValueError(f"AdaptiveKLController: target={target} must be > 0 and horizon={horizon} >= 1")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Fold in the mean over a batch of ``n_steps`` sequences of each one's summed KL."""
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """Coefficient for checkpoints."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.value = float(state["value"])


def kl_controller(cfg: PPOConfig) -> FixedKLController | AdaptiveKLController:
    """The controller ``cfg`` asks for."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


# ---- rewards ------------------------------------------------------------------------------------
def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last masked entry ``[B]`` (0 for an empty row)."""
    t = mask.shape[-1]
    pos = torch.arange(t, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), pos, torch.zeros_like(pos)).max(-1).values


def shape_scores(
    scores: torch.Tensor,
    no_eos: torch.Tensor,
    cfg: PPOConfig,
    normalizer: RunningMeanStd | None = None,
) -> torch.Tensor:
    """Task scores ``[B]`` as PPO uses them: truncation penalty, running scaling, clipping.

    ``normalizer`` is updated with the penalised scores before scaling (required unless
    ``cfg.reward_scaling == 'none'``).
    """
    s = scores.float()
    if cfg.truncation == "penalty":
        s = s + cfg.truncation_penalty * no_eos.float()
    if cfg.reward_scaling != "none":
        if normalizer is None:
            raise ValueError(
                f"PPOConfig.reward_scaling={cfg.reward_scaling!r} needs a RunningMeanStd normalizer"
            )
        normalizer.update(s)
        s = normalizer.normalize(s, subtract_mean=cfg.reward_scaling == "normalize")
    if cfg.reward_clip is not None:
        s = s.clamp(-cfg.reward_clip, cfg.reward_clip)
    return s


def token_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: KLLossEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-action rewards ``-kl_coef * KL_t``, plus the score on each row's last action.

    Returns ``(rewards, kl)``, both ``[B, T]`` and zero outside ``mask``.
    """
    m = mask.to(torch.float32)
    kl = kl_per_token(logp.float(), ref_logp.float(), estimator) * m
    rewards = -kl_coef * kl
    idx = last_index(mask).unsqueeze(-1)
    has = mask.any(-1, keepdim=True).float()
    rewards = rewards.scatter_add(-1, idx, scores.float().unsqueeze(-1) * has)
    return rewards, kl


# ---- advantages ---------------------------------------------------------------------------------
def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
    bootstrap: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the masked actions of each row.

    ``delta_t = r_t + gamma * V_next - V_t``, ``A_t = delta_t + gamma * lam * A_next``, where
    "next" is the row's next masked action (entries outside ``mask`` are skipped, so any padding
    works). After a row's last action ``V_next`` is ``bootstrap`` (``[B]``; 0 when None: the
    episode ended). Returns ``(advantages, returns)`` with ``returns = A + V``, zero off the mask.
    """
    m = mask.bool()
    r = rewards.float()
    v = values.float()
    b, t = r.shape
    next_v = torch.zeros(b, dtype=r.dtype, device=r.device) if bootstrap is None else bootstrap.float()
    next_a = torch.zeros(b, dtype=r.dtype, device=r.device)
    adv = torch.zeros_like(r)
    for i in range(t - 1, -1, -1):
        delta = r[:, i] + gamma * next_v - v[:, i]
        a = delta + gamma * lam * next_a
        mi = m[:, i]
        adv[:, i] = torch.where(mi, a, torch.zeros_like(a))
        next_a = torch.where(mi, a, next_a)
        next_v = torch.where(mi, v[:, i], next_v)
    returns = (adv + v) * m
    return adv, returns


def split_values(
    values: torch.Tensor, mask: torch.Tensor, no_eos: torch.Tensor | None, truncation: str = "bootstrap"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position values ``[B, S]`` -> (action values ``[B, T]``, bootstrap values ``[B]``).

    The bootstrap of a row is the value after its last action, kept only for truncated rows
    (``no_eos``) under ``truncation='bootstrap'``; finished rows end with value 0.
    """
    if values.shape[-1] != mask.shape[-1] + 1:
        raise ValueError(
            f"values {tuple(values.shape)} must have one more position than the action mask {tuple(mask.shape)}"
        )
    v = values.float()
    after = v.gather(-1, (last_index(mask) + 1).unsqueeze(-1)).squeeze(-1)
    keep = torch.zeros_like(after) if no_eos is None or truncation != "bootstrap" else no_eos.float()
    return v[:, :-1] * mask.float(), after * keep * mask.any(-1).float()


@dataclass(frozen=True)
class Experience:
    """What both PPO train calls derive from one batch of samples."""

    advantages: torch.Tensor
    """``[B, T]`` advantages (whitened when configured), zero off the mask."""
    returns: torch.Tensor
    """``[B, T]`` value targets."""
    values: torch.Tensor
    """``[B, T]`` old values of the actions (the critic's clipping anchor)."""
    rewards: torch.Tensor
    """``[B, T]`` shaped per-action rewards (KL penalty plus final score)."""
    kl: torch.Tensor
    """``[B, T]`` per-token KL estimate against the reference."""
    metrics: dict[str, float]
    """Batch statistics: reward/mean, response_length/mean, actor/ref_kl, critic/advantages/mean, ..."""


def ppo_experience(
    scores: torch.Tensor,
    values: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    no_eos: torch.Tensor,
    cfg: PPOConfig,
    kl_coef: float | None = None,
    normalizer: RunningMeanStd | None = None,
) -> Experience:
    """Scores, values and log-probs of a batch -> advantages and returns (see the module doc for shapes).

    ``kl_coef`` overrides ``cfg.kl_coef`` (pass the controller's current value). The statistics
    are over the rows given: call it on the whole global batch so whitening and reward scaling
    see every sample, then slice the results for each replica.
    """
    coef = cfg.kl_coef if kl_coef is None else kl_coef
    raw = scores.float()
    shaped = shape_scores(raw, no_eos, cfg, normalizer)
    rewards, kl = token_rewards(shaped, old_logp, ref_logp, mask, coef, cfg.kl_estimator)
    v, boot = split_values(values, mask, no_eos, cfg.truncation)
    adv, ret = compute_gae(rewards, v, mask, cfg.gamma, cfg.lam, boot)
    if cfg.whiten_advantages:
        adv = masked_whiten(adv, mask)
    m = mask.float()
    lengths = m.sum(-1)
    metrics = {
        "reward/mean": float(raw.mean()),
        "critic/score/mean": float(shaped.mean()),
        "critic/rewards/mean": float(masked_sum(rewards, m) / max(1, raw.numel())),
        "critic/advantages/mean": float(masked_mean(adv, m)),
        "critic/returns/mean": float(masked_mean(ret, m)),
        "critic/values/mean": float(masked_mean(v, m)),
        "actor/ref_kl": float((kl.sum(-1)).mean()),
        "actor/kl_coef": float(coef),
        "response_length/mean": float(lengths.mean()),
        "response_length/clip_ratio": float(no_eos.float().mean()),
    }
    return Experience(adv, ret, v, rewards, kl, metrics)


# ---- losses -------------------------------------------------------------------------------------
def clipped_surrogate(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate from ``log_ratio = logp - old_logp`` (any shape).

    ``loss = max(-A r, -A clip(r, 1 - clip_eps, 1 + clip_eps_high))`` with ``r = exp(log_ratio)``
    (DAPO's clip-higher when ``clip_eps_high > clip_eps``); with ``dual_clip = c`` the loss of a
    negative-advantage token is also capped at ``-c A`` (Ye et al. 2020). Returns ``(loss, clipped,
    clipped_lower)``: ``clipped`` is 1 where the clipped term is the larger loss, ``clipped_lower``
    1 where the dual-clip cap is active (verl's ``pg_clipfrac_lower``; all 0 without dual clip).
    """
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(log_ratio.float().clamp(-20.0, 20.0))
    adv = advantages.float()
    loss1 = -adv * ratio
    loss2 = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    loss = torch.maximum(loss1, loss2)
    clipped = (loss2 > loss1).float()
    lower = torch.zeros_like(loss)
    if dual_clip is not None:
        cap = -adv * dual_clip
        neg = adv < 0
        lower = ((loss > cap) & neg).float()
        loss = torch.where(neg, torch.minimum(loss, cap), loss)
    return loss, clipped, lower


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    reduction: Reduction = "mean",
    *,
    weights: torch.Tensor | None = None,
    loss_agg: LossAgg = "token-mean",
    loss_agg_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``max(-A r, -A clip(r, 1 - eps, 1 + eps_high))`` with ``r = exp(logp - old_logp)``.

    With ``dual_clip = c`` the loss of a negative-advantage token is also capped at ``-c A``
    (:func:`clipped_surrogate`). ``advantages`` is ``[B, T]`` or ``[B]`` (one per sequence).
    ``weights`` (``[B, T]``, no gradient) multiply the per-token loss: the truncated importance
    weights of :func:`lightning_real.algorithms.correction.tis_weights`. The token losses are
    aggregated as ``loss_agg`` (:func:`lightning_real.algorithms.aggregation.agg_loss`; the default
    'token-mean' is the masked mean or sum of ``reduce``). Metrics, aggregated the same way:
    ``actor/pg_loss``, ``actor/pg_clipfrac`` (share of tokens where the clipped term is the larger
    loss), ``actor/pg_clipfrac_lower`` (share where the dual-clip cap is active),
    ``actor/ppo_kl`` (``old_logp - logp``, the k1 estimate of KL(old || new)).
    """
    check_loss_agg(loss_agg, loss_agg_len)
    m = mask.float()
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1).expand_as(m)
    log_ratio = (logp - old_logp).float()
    loss, clipped, lower = clipped_surrogate(log_ratio, adv, clip_eps, clip_eps_high, dual_clip)
    if weights is not None:
        loss = loss * weights.detach().float()

    def agg(x: torch.Tensor) -> torch.Tensor:
        return agg_loss(x, m, loss_agg, reduction, loss_agg_len)

    metrics = {
        "actor/pg_loss": agg(loss.detach()),
        "actor/pg_clipfrac": agg(clipped),
        "actor/pg_clipfrac_lower": agg(lower),
        "actor/ppo_kl": agg(-log_ratio.detach()),
    }
    return agg(loss), metrics


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    reduction: Reduction = "mean",
    *,
    loss_agg: LossAgg = "token-mean",
    loss_agg_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``0.5 * max((V - R)^2, (V_clipped - R)^2)`` with ``V_clipped = V_old + clip(V - V_old, ±eps)``.

    ``clip_eps=None`` gives ``0.5 * (V - R)^2``. Token losses are aggregated as ``loss_agg``
    (default 'token-mean': the masked mean or sum). Metrics, aggregated the same way:
    ``critic/vf_loss``, ``critic/vf_clipfrac`` (share of tokens where the clipped error is the
    larger), ``critic/vpred_mean``.
    """
    check_loss_agg(loss_agg, loss_agg_len)
    v = values.float()
    err = (v - returns.float()) ** 2
    if clip_eps is None:
        loss = 0.5 * err
        clipped = torch.zeros_like(err)
    else:
        vc = old_values.float() + (v - old_values.float()).clamp(-clip_eps, clip_eps)
        err_c = (vc - returns.float()) ** 2
        loss = 0.5 * torch.maximum(err, err_c)
        clipped = (err_c > err).float()
    m = mask.float()

    def agg(x: torch.Tensor) -> torch.Tensor:
        return agg_loss(x, m, loss_agg, reduction, loss_agg_len)

    metrics = {
        "critic/vf_loss": agg(loss.detach()),
        "critic/vf_clipfrac": agg(clipped),
        "critic/vpred_mean": agg(v.detach()),
    }
    return agg(loss), metrics


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dim: ``logsumexp(z) - sum(softmax(z) * z)``.

    Takes full-vocabulary logits. With logits split over tensor-parallel ranks the same formula
    needs three sums over the group (max, sum of exp, sum of exp * z):
    :func:`lightning_real.models.train.vocab_parallel_entropy` does that.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def entropy_metric(
    entropy: torch.Tensor, mask: torch.Tensor, reduction: Reduction = "mean"
) -> dict[str, torch.Tensor]:
    """``actor/entropy`` over the masked tokens."""
    return {"actor/entropy": reduce(entropy.detach().float(), mask.float(), reduction)}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var[R - V] / Var[R]`` over the masked tokens (1: perfect, 0: no better than the mean).

    Returns NaN when the returns have no variance.
    """
    var_r = masked_var(returns.float(), mask)
    if float(var_r) == 0.0:
        return float("nan")
    return float(1.0 - masked_var(returns.float() - values.float(), mask) / var_r)


def actor_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    entropy: torch.Tensor | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy loss under ``cfg`` minus ``cfg.entropy_coef`` times the entropy (when given)."""
    loss, metrics = policy_loss(
        logp, old_logp, advantages, mask, cfg.clip_eps, cfg.clip_eps_high, cfg.dual_clip, reduction
    )
    if entropy is not None:
        metrics.update(entropy_metric(entropy, mask, reduction))
        if cfg.entropy_coef:
            loss = loss - cfg.entropy_coef * reduce(entropy.float(), mask.float(), reduction)
    return loss, metrics


def critic_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cfg: PPOConfig,
    reduction: Reduction = "mean",
    gen_len: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss under ``cfg`` (``values`` are the new action values ``[B, T]``), aggregated as
    ``cfg.loss_agg`` (``gen_len``: the length of 'seq-mean-token-sum-norm' when loss_agg_len is unset)."""
    length = cfg.loss_agg_len if cfg.loss_agg_len is not None else gen_len
    return value_loss(
        values,
        old_values,
        returns,
        mask,
        cfg.value_clip,
        reduction,
        loss_agg=cfg.loss_agg,
        loss_agg_len=length,
    )
