"""What the runtime actually built, read off the objects themselves (not off its configuration).

Tests compare it with what the planner priced (``Workload.features``): a feature the builder
ignored or got wrong shows up as a difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_real.runtime.build import RuntimeContext


@dataclass(frozen=True)
class BuiltRole:
    """One role's home shard and training engine on this rank."""

    dtype: torch.dtype
    """Dtype of its parameters (the working copy)."""
    master_weights: bool
    """Whether its optimizer updates fp32 master copies of 16-bit parameters."""
    distributed_optimizer: bool | None
    """Whether its Adam states are split over the data-parallel group; None when frozen."""
    attention: str
    """Core attention kernel: 'local' (megatron-core's unfused attention) or 'sdpa'."""
    recompute: str
    """Activation recomputation the model was built with: 'none', 'selective' or 'full'."""
    grad_bucket_elems: int | None
    """Elements per gradient-reduction bucket of its flat buffers (None: one reduction after the
    backward, or frozen)."""


def _attention(module: torch.nn.Module) -> str:
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from lightning_real.models.attention import SDPAttention

    kinds = set()
    for name, m in module.named_modules():
        if name.endswith("core_attention"):
            kinds.add(
                "sdpa"
                if isinstance(m, SDPAttention)
                else "local"
                if isinstance(m, DotProductAttention)
                else type(m).__name__
            )
    if len(kinds) != 1:
        raise RuntimeError(f"expected one core-attention kind, found {sorted(kinds) or 'none'}")
    return kinds.pop()


def observe(ctx: RuntimeContext) -> tuple[dict[str, BuiltRole], dict[str, str]]:
    """``(role -> BuiltRole, generate call -> engine backend)`` on this rank (members only)."""
    roles: dict[str, BuiltRole] = {}
    for role, pooled in ctx.pool.models.items():
        shard = pooled.home
        if shard.module is None:
            continue
        params = [p for _, p in shard.params()]
        engine = ctx.engines.get(role)
        granularity = getattr(shard.module.config, "recompute_granularity", None)
        roles[role] = BuiltRole(
            dtype=params[0].dtype,
            master_weights=engine is not None and engine.has_master_weights,
            distributed_optimizer=None if engine is None else engine.distributed,
            attention=_attention(shard.module),
            recompute=granularity or "none",
            grad_bucket_elems=None if engine is None or engine.flat is None else engine.flat.bucket_elems,
        )
    return roles, {call: g.backend for call, g in ctx.generators.items()}
