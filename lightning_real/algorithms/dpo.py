"""DPO (Rafailov et al., 2023): preference optimisation against a frozen reference, no reward model.

Inputs are *sequence* log-probabilities: each answer's token log-probs summed over its response
tokens (:func:`sequence_logps`). The loss of a pair is
``-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))``; with label smoothing ``eps`` (cDPO)
``-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_real.algorithms.masked import Reduction, masked_sum


@dataclass(frozen=True)
class DPOConfig:
    """DPO hyper-parameters (defaults as TRL's DPOTrainer)."""

    beta: float = 0.1
    """Inverse temperature: how far the policy may move from the reference."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); 0 is plain DPO."""

    def __post_init__(self) -> None:
        if not isinstance(self.beta, int | float) or self.beta <= 0:
            raise ValueError(f"DPOConfig.beta={self.beta!r}; allowed: a number > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"DPOConfig.label_smoothing={self.label_smoothing!r}; allowed: a number in [0, 0.5)"
            )


def sequence_logps(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of each row's masked token log-probabilities ``[B]``."""
    return masked_sum(token_logp.float(), mask, dim=-1)


def dpo_loss(
    chosen_logp: torch.Tensor,
    rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    cfg: DPOConfig | None = None,
    reduction: Reduction = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sigmoid DPO loss over ``[B]`` pairs of sequence log-probabilities.

    Metrics (TRL's names): ``rewards/chosen`` and ``rewards/rejected`` (``beta * (pi - ref)``),
    ``rewards/margins``, ``rewards/accuracies`` (share of pairs with chosen reward > rejected),
    ``dpo/loss``. Reduced like the loss (means, or sums over pairs).
    """
    cfg = cfg or DPOConfig()
    rc = cfg.beta * (chosen_logp.float() - ref_chosen_logp.float())
    rr = cfg.beta * (rejected_logp.float() - ref_rejected_logp.float())
    h = rc - rr
    eps = cfg.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(h) - eps * F.logsigmoid(-h)

    def red(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if reduction == "mean" else x.sum()

    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}; allowed: mean, sum")
    metrics = {
        "dpo/loss": red(losses.detach()),
        "rewards/chosen": red(rc.detach()),
        "rewards/rejected": red(rr.detach()),
        "rewards/margins": red(h.detach()),
        "rewards/accuracies": red((rc > rr).float()),
    }
    return red(losses), metrics
