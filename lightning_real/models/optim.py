"""AdamW over one rank's shard, its learning-rate schedule and global-norm gradient clipping.

The optimizer is plain ``torch.optim.AdamW`` over the rank's local parameters: Adam is
elementwise, so its state is naturally sharded exactly like the parameters and equals the
matching slice of the single-device state. What needs the layout is the gradient norm: it is
taken over the whole model, so each canonical element must be counted exactly once although
some parameters are held by several ranks (norms, row-parallel biases, learned positions and
the value head on every tensor-parallel rank; the tied output copy on the last pipeline stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.sharding import WORD_EMBEDDINGS, ParamSpec

NamedParams = list[tuple[ParamSpec, nn.Parameter]]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters, learning-rate schedule and gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam coefficients of the running averages of the gradient and its square."""
    eps: float = 1e-8
    """Adam denominator term."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices (embeddings, projections, heads) only."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm; None or 0 disables clipping (the norm is still reported)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr/warmup_steps to lr."""
    decay_steps: int = 0
    """Steps of cosine decay from lr to min_lr after warm-up; 0 keeps lr constant."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr={self.lr!r}; allowed: a positive number")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas={self.betas!r}; allowed: two numbers in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps={self.eps!r}; allowed: a positive number")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r}; allowed: a number >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(
                f"OptimConfig.max_grad_norm={self.max_grad_norm!r}; allowed: None, 0 (off) or a positive number"
            )
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"OptimConfig.{name}={v!r}; allowed: an integer >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig.min_lr={self.min_lr!r}; allowed: a number in [0, lr={self.lr}]")


def lr_at(config: OptimConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.decay_steps == 0:
        return config.lr
    t = min(step - config.warmup_steps, config.decay_steps) / config.decay_steps
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * t))


def decays(ps: ParamSpec) -> bool:
    """Whether weight decay applies: matrices do, vectors (norms, biases) do not."""
    return len(ps.canonical_shape) >= 2


def build_adamw(params: NamedParams, config: OptimConfig) -> torch.optim.AdamW:
    """AdamW over this rank's parameters, in two groups (with and without weight decay).

    Group order and the parameter order inside each group follow ``params``, so every rank with
    the same layout coordinates builds the same optimizer (and can load its state dict).
    """
    decay = [p for ps, p in params if decays(ps)]
    plain = [p for ps, p in params if not decays(ps)]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    # foreach=False: the per-tensor loop is the reference semantics on any device and layout.
    return torch.optim.AdamW(groups, lr=lr_at(config, 0), betas=config.betas, eps=config.eps, foreach=False)


def counts_once(ps: ParamSpec, groups: LayoutGroups, tied_pp: bool) -> bool:
    """Whether this rank's copy of ``ps`` enters the global norm (each element exactly once)."""
    if ps.tp_dim is None and groups.tp_rank != 0:
        return False  # replicated over tensor-parallel ranks: tp rank 0 speaks for all
    # The tied output copy on the last stage repeats the first stage's embedding.
    return not (tied_pp and ps.key == WORD_EMBEDDINGS and not groups.is_first_stage)


def global_grad_norm(params: NamedParams, groups: LayoutGroups, tied_pp: bool) -> float:
    """L2 norm of the whole model's gradient (one replica: summed over its tp x pp ranks)."""
    dev = params[0][1].device if params else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=dev)
    for ps, p in params:
        if p.grad is not None and counts_once(ps, groups, tied_pp):
            sq += p.grad.detach().double().pow(2).sum()
    if groups.layout.tp * groups.layout.pp > 1:
        dist.all_reduce(sq, group=groups.mp)
    return float(sq.sqrt())


@torch.no_grad()
def clip_grads_(params: NamedParams, max_norm: float | None, total_norm: float) -> float:
    """Scale gradients so their global norm is at most ``max_norm``; returns the factor used.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: factor = max_norm / (norm + 1e-6), capped at 1.
    """
    if not max_norm:
        return 1.0
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    if coef < 1.0:
        for _, p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return coef


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr
