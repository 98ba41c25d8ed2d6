"""Masked reductions and normalisers shared by the losses (pure torch, no process groups)."""

from __future__ import annotations

from typing import Literal

import torch

Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is nonzero (over everything, or along ``dim``)."""
    m = mask.to(x.dtype)
    return (x * m).sum() if dim is None else (x * m).sum(dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the masked entries; 0 where the mask is empty."""
    m = mask.to(x.dtype)
    n = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / n.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance over the masked entries (population variance unless ``unbiased``)."""
    mean = masked_mean(x, mask)
    m = mask.to(x.dtype)
    n = m.sum()
    ss = ((x - mean) ** 2 * m).sum()
    return ss / (n - 1).clamp(min=1) if unbiased else ss / n.clamp(min=1)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (population std), 0 outside the mask.

    With ``shift_mean=False`` the mean is added back (scale only), as TRL's option does.
    """
    mean = masked_mean(x, mask)
    out = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def reduce(x: torch.Tensor, mask: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    """Masked ``mean`` or ``sum`` of a per-token loss.

    ``sum`` suits :class:`~lightning_real.models.train.TrainEngine`, which divides summed losses by
    the number of masked tokens of the whole global batch (so the result equals the one-device mean).
    """
    if reduction == "mean":
        return masked_mean(x, mask)
    if reduction == "sum":
        return masked_sum(x, mask)
    raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(REDUCTIONS)}")


class RunningMeanStd:
    """Running mean and variance of a scalar stream (Chan et al.'s parallel update).

    Used to scale rewards. Feed it the scores of the whole global batch (gather them first when
    each replica holds a share), so every rank keeps the same statistics.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        self.mean = 0.0
        self.var = 1.0
        self.count = 0.0
        self.eps = eps

    def update(self, x: torch.Tensor) -> None:
        """Fold the values of ``x`` (any shape) into the statistics."""
        x = x.detach().double().flatten()
        n = float(x.numel())
        if n == 0:
            return
        b_mean = float(x.mean())
        b_var = float(x.var(unbiased=False))
        if self.count == 0:
            self.mean, self.var, self.count = b_mean, b_var, n
            return
        tot = self.count + n
        delta = b_mean - self.mean
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / tot
        self.mean += delta * n / tot
        self.var = m2 / tot
        self.count = tot

    @property
    def std(self) -> float:
        """Running standard deviation."""
        return float((self.var + self.eps) ** 0.5)

    def normalize(self, x: torch.Tensor, subtract_mean: bool = False) -> torch.Tensor:
        """``x / std`` (or ``(x - mean) / std``) with the current statistics."""
        return ((x - self.mean) if subtract_mean else x) / self.std

    def state_dict(self) -> dict[str, float]:
        """Statistics for checkpoints."""
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore :meth:`state_dict`."""
        self.mean, self.var, self.count = float(state["mean"]), float(state["var"]), float(state["count"])
