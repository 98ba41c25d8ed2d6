"""Run microbatches through a model's pipeline stages (GPipe order) with explicit point-to-point.

Stage ``k`` of a replica receives hidden states from stage ``k-1`` (same dp and tp coordinates),
runs its layers and sends to ``k+1``; for training, gradients travel back the same way after all
forwards. Every message is between two fixed ranks in a fixed order, so it needs no negotiation,
and the layout's own ranks are used, so several models with different layouts coexist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.models.shard import ModelShard


@dataclass(frozen=True)
class MicroBatch:
    """Inputs of one microbatch, in megatron's convention."""

    input_ids: torch.Tensor
    """[b, s] token ids."""
    position_ids: torch.Tensor
    """[b, s] positions (left padding and packing aware)."""
    attention_mask: torch.Tensor | None
    """[b, 1, s, s] bool, True = masked out; None for a plainly causal batch (see ``masks.model_mask``)."""
    extra: dict[str, torch.Tensor]
    """Anything the loss needs (labels, masks, advantages...)."""


def neighbours(shard: ModelShard) -> tuple[int | None, int | None]:
    """Global ranks of the previous and next pipeline stage of this rank's replica (None at the ends)."""
    g = shard.groups
    lay = shard.layout
    prev = lay.rank_at(g.dp_rank, g.tp_rank, g.pp_rank - 1) if g.pp_rank > 0 else None
    nxt = lay.rank_at(g.dp_rank, g.tp_rank, g.pp_rank + 1) if g.pp_rank < lay.pp - 1 else None
    return prev, nxt


def _hidden_shape(shard: ModelShard, mb: MicroBatch) -> tuple[int, int, int]:
    b, s = mb.input_ids.shape
    return s, b, shard.spec.hidden_size


def run_forward(
    shard: ModelShard,
    mbs: list[MicroBatch],
    on_output: Callable[[torch.Tensor, MicroBatch], Any],
    train: bool = False,
) -> list[Any]:
    """Forward every microbatch; the last stage maps each output with ``on_output``.

    With ``train=True`` autograd state is kept and :func:`run_backward` must follow with the
    returned list. Returns ``on_output`` results on the last stage, ``None`` items elsewhere.
    """
    model = shard.module
    assert model is not None, "run_forward called on a rank outside the layout"
    prev, nxt = neighbours(shard)
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    results: list[Any] = []
    for mb in mbs:
        x_in = None
        if prev is not None:
            x_in = torch.empty(_hidden_shape(shard, mb), dtype=dtype, device=device)
            dist.recv(x_in, prev)
            x_in.requires_grad_(train)
            model.set_input_tensor(x_in)
        with torch.set_grad_enabled(train):
            out = model(mb.input_ids, mb.position_ids, mb.attention_mask)
        if nxt is not None:
            dist.send(out.detach().contiguous(), nxt)
            results.append((x_in, out) if train else None)
        else:
            with torch.set_grad_enabled(train):
                res = on_output(out, mb)
            results.append((x_in, res) if train else res)
    return results


def run_backward(shard: ModelShard, saved: list[Any], scale: float = 1.0) -> None:
    """Backward through :func:`run_forward`'s saved state (last stage: losses; others: outputs)."""
    prev, nxt = neighbours(shard)
    for x_in, out in reversed(saved):
        if nxt is None:
            loss = out[0] if isinstance(out, tuple) else out
            (loss * scale).backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, nxt)
            out.backward(grad)
        if prev is not None:
            assert x_in is not None and x_in.grad is not None
            dist.send(x_in.grad.contiguous(), prev)


def broadcast_from_last_stage(
    shard: ModelShard, value: torch.Tensor | None, shape: tuple, dtype: torch.dtype
) -> torch.Tensor:
    """``value`` (given on the last stage) on every stage of this rank's pipeline."""
    lay = shard.layout
    if lay.pp == 1:
        assert value is not None
        return value
    g = shard.groups
    src = lay.rank_at(g.dp_rank, g.tp_rank, lay.pp - 1)
    if value is None:
        value = torch.empty(shape, dtype=dtype, device=next(shard.module.parameters()).device)  # type: ignore[union-attr]
    value = value.contiguous()
    dist.broadcast(value, src, group=g.pp)
    return value
