"""RLHF losses and advantage estimators: PPO, GRPO, ReMax, DPO, SFT and reward modelling.

Pure torch and free of process groups: each function works on the tensors of one batch (or
microbatch) and returns losses and metrics named as OpenRLHF, verl and TRL name them.
"""

from lightning_real.algorithms.dpo import DPOConfig, dpo_loss, sequence_logps
from lightning_real.algorithms.grpo import GRPOConfig, group_advantages, grpo_loss, grpo_metrics
from lightning_real.algorithms.masked import (
    RunningMeanStd,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from lightning_real.algorithms.ppo import (
    AdaptiveKLController,
    Experience,
    FixedKLController,
    PPOConfig,
    actor_loss,
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
    "AdaptiveKLController",
    "DPOConfig",
    "Experience",
    "FixedKLController",
    "GRPOConfig",
    "PPOConfig",
    "RunningMeanStd",
    "actor_loss",
    "compute_gae",
    "critic_loss",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "group_advantages",
    "grpo_loss",
    "grpo_metrics",
    "kl_controller",
    "kl_per_token",
    "last_token_scores",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "policy_loss",
    "ppo_experience",
    "remax_advantages",
    "sequence_logps",
    "sft_loss",
    "shape_scores",
    "split_values",
    "token_logprobs",
    "token_rewards",
    "value_loss",
]
