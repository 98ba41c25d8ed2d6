"""Log-probabilities and entropy from logits split over tensor-parallel ranks, without gathering them.

megatron-core's ``vocab_parallel_cross_entropy`` reads its process-wide tensor-parallel group;
models here carry their own groups, so these versions take the group explicitly. Sums go through
``torch.distributed.nn`` collectives, which are differentiable, so losses built on them train.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn as dnn


def _shifted(logits: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    # The max only stabilises exp(); it carries no gradient.
    m = logits.detach().amax(-1, keepdim=True)
    if tp > 1:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    return logits - m


def _sum(x: torch.Tensor, group: Any, tp: int) -> torch.Tensor:
    return dnn.all_reduce(x, op=dist.ReduceOp.SUM, group=group) if tp > 1 else x


def logprobs_of(
    logits: torch.Tensor, labels: torch.Tensor, group: Any = None, tp_rank: int = 0, tp: int = 1
) -> torch.Tensor:
    """``log softmax(logits)[labels]`` over the full vocabulary; ``logits`` [..., V/tp] is this rank's slice."""
    z = _shifted(logits.float(), group, tp)
    lse = _sum(z.exp().sum(-1), group, tp).log()
    v = z.shape[-1]
    lo = tp_rank * v
    inside = (labels >= lo) & (labels < lo + v)
    idx = (labels - lo).clamp(0, v - 1)
    target = z.gather(-1, idx.unsqueeze(-1)).squeeze(-1) * inside
    return _sum(target, group, tp) - lse


def entropy_of(logits: torch.Tensor, group: Any = None, tp: int = 1) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the full vocabulary, per position."""
    z = _shifted(logits.float(), group, tp)
    e = z.exp()
    s = _sum(e.sum(-1), group, tp)
    return s.log() - _sum((e * z).sum(-1), group, tp) / s


def gather_vocab(logits: torch.Tensor, group: Any = None, tp: int = 1) -> torch.Tensor:
    """Full-vocabulary logits from the tensor-parallel slices (tests and debugging only)."""
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, -1)
