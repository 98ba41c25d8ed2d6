"""What a module declares about its models: one :class:`RoleDecl` per role.

A module says which models it has, where each comes from and how the trained ones learn; the
runtime (:func:`lightning_real.runtime.build.build_runtime`) builds them: each role's home shard on
the layout of its home call (:meth:`lightning_real.dataflow.DataflowGraph.home_calls`), a
reallocator for its other calls, and a training engine for each trained role.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lightning_real.models.optim import OptimConfig
from lightning_real.models.source import ModelSource
from lightning_real.models.spec import ModelSpec

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, Batch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""``loss_fn(output, microbatch) -> (summed loss, summed metrics)`` (see models.train)."""


@dataclass(frozen=True)
class Training:
    """How a trained role learns."""

    loss: LossFn
    """Loss of one microbatch, summed (the engine divides by the global normaliser)."""
    optim: OptimConfig
    """AdamW, learning-rate schedule and clipping."""
    norm_key: str | None = "action_mask"
    """Batch entry whose sum over the global batch divides the summed loss; None: the number of
    sequences."""
    packable: bool = True
    """Whether the loss is a sum over tokens, which packed rows keep (a per-sequence average is not)."""


@dataclass(frozen=True)
class RoleDecl:
    """One model of a module."""

    role: str
    """'actor', 'critic', 'reward' or 'ref'."""
    source: ModelSource
    """HF checkpoint folder, or a ModelSpec for a random init."""
    spec: ModelSpec
    """Its architecture, with the head the role needs."""
    seed: int = 0
    """Seed of a random init (the same seed gives the same model under any layout)."""
    init_value_head: bool = False
    """A value head read from a causal-LM folder starts at zero (critic from the actor, reward
    model from the SFT model)."""
    training: Training | None = None
    """How the role learns; None: frozen (its moved copies are kept between iterations)."""

    @property
    def trained(self) -> bool:
        """Whether the role has an optimizer."""
        return self.training is not None
