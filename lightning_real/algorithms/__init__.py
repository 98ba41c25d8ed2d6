"""RLHF losses and advantage estimators: PPO, GRPO (and Dr. GRPO, DAPO, GSPO), RLOO, REINFORCE++,
ReMax, DPO, SFT and reward modelling.

Pure torch and free of process groups: each function works on the tensors of one batch (or
microbatch) and returns losses and metrics named as OpenRLHF, verl and TRL name them.
"""

from lightning_real.algorithms.advantages import (
    ADV_ESTIMATORS,
    AdvantageConfig,
    compute_advantages,
    discounted_returns,
    passk_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from lightning_real.algorithms.aggregation import LOSS_AGG_MODES, agg_loss, agg_norm_key, agg_normaliser
from lightning_real.algorithms.correction import tis_metrics, tis_weights
from lightning_real.algorithms.dapo import (
    DAPOConfig,
    concat_rows,
    keep_groups,
    overlong_penalty,
    refill_groups,
    select_rows,
)
from lightning_real.algorithms.dpo import DPOConfig, dpo_loss, sequence_logps
from lightning_real.algorithms.grpo import GRPOConfig, group_advantages, grpo_loss, grpo_metrics
from lightning_real.algorithms.gspo import gspo_loss, sequence_log_ratio
from lightning_real.algorithms.masked import (
    RunningMeanStd,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from lightning_real.algorithms.policy import PolicyLossConfig, combined_policy_loss, kl_loss
from lightning_real.algorithms.ppo import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    PPOConfig,
    actor_loss,
    clipped_surrogate,
    compute_gae,
    critic_loss,
    entropy_from_logits,
    explained_variance,
    kl_controller,
    kl_per_token,
    policy_loss,
    ppo_experience,
    shape_scores,
    split_values,
    token_rewards,
    value_loss,
)
from lightning_real.algorithms.remax import remax_advantages
from lightning_real.algorithms.rw import last_token_scores, pairwise_loss
from lightning_real.algorithms.sft import sft_loss, token_logprobs

__all__ = [
    "ADV_ESTIMATORS",
    "LOSS_AGG_MODES",
    "AdaptiveKLController",
    "AdvantageConfig",
    "DAPOConfig",
    "DPOConfig",
    "Experience",
    "FixedKLController",
    "GRPOConfig",
    "PPOConfig",
    "PolicyLossConfig",
    "RunningMeanStd",
    "actor_loss",
    "agg_loss",
    "agg_norm_key",
    "agg_normaliser",
    "clipped_surrogate",
    "combined_policy_loss",
    "compute_advantages",
    "compute_gae",
    "concat_rows",
    "critic_loss",
    "discounted_returns",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "group_advantages",
    "grpo_loss",
    "grpo_metrics",
    "gspo_loss",
    "keep_groups",
    "kl_controller",
    "kl_loss",
    "kl_per_token",
    "last_token_scores",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "overlong_penalty",
    "pairwise_loss",
    "passk_advantages",
    "policy_loss",
    "ppo_experience",
    "refill_groups",
    "reinforce_pp_advantages",
    "remax_advantages",
    "rloo_advantages",
    "select_rows",
    "sequence_log_ratio",
    "sequence_logps",
    "sft_loss",
    "shape_scores",
    "split_values",
    "tis_metrics",
    "tis_weights",
    "token_logprobs",
    "token_rewards",
    "value_loss",
]
