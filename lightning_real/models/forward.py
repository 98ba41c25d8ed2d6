"""Forward passes under any layout: logits, log-probabilities of the next tokens, values.

Each data-parallel replica processes the rows it is given; results end up on every rank of the
replica (all tensor and pipeline ranks), ready for the runtime to hand on. Masks and positions
come from :mod:`lightning_real.models.masks` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_real.models.masks import attention_mask_4d, position_ids
from lightning_real.models.pipeline import MicroBatch, broadcast_from_last_stage, run_forward
from lightning_real.models.shard import ModelShard
from lightning_real.models.vocab_parallel import gather_vocab, vocab_parallel_logprobs

__all__ = [
    "attention_mask_4d",
    "forward_logits",
    "forward_logprobs",
    "forward_values",
    "microbatches",
    "position_ids",
]


def microbatches(
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int,
    segment_ids: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> list[MicroBatch]:
    """Split rows into ``n_mbs`` microbatches (as even as possible)."""
    if input_ids.dim() != 2 or pad_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids and pad_mask must both be [batch, seq]; got {tuple(input_ids.shape)} "
            f"and {tuple(pad_mask.shape)}"
        )
    b = input_ids.shape[0]
    if n_mbs < 1 or n_mbs > b:
        raise ValueError(f"n_mbs={n_mbs} must be between 1 and the batch size {b}")
    out = []
    for idx in torch.arange(b).tensor_split(n_mbs):
        ids, pm = input_ids[idx], pad_mask[idx]
        seg = segment_ids[idx] if segment_ids is not None else None
        out.append(
            MicroBatch(
                ids,
                position_ids(pm, seg),
                attention_mask_4d(pm, seg),
                {k: v[idx] for k, v in (extra or {}).items()},
            )
        )
    return out


def _run(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int,
    segment_ids: torch.Tensor | None,
    fn: Callable[[torch.Tensor, MicroBatch], torch.Tensor],
    width: int | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    if shard.module is None:
        raise RuntimeError(f"rank {shard.groups.rank} is not in layout {shard.layout}; only its ranks run it")
    # Inputs may arrive on the CPU (from the data loader); the model's device is where they go.
    dev = next(shard.module.parameters()).device
    input_ids, pad_mask = input_ids.to(dev), pad_mask.to(dev)
    segment_ids = segment_ids.to(dev) if segment_ids is not None else None
    mbs = microbatches(input_ids, pad_mask, n_mbs, segment_ids)
    with torch.no_grad():
        parts = run_forward(shard, mbs, fn)
    b, s = input_ids.shape
    shape = (b, s) if width is None else (b, s, width)
    value = torch.cat(parts, 0) if shard.groups.is_last_stage else None
    return broadcast_from_last_stage(shard, value, shape, dtype)


def forward_logits(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] on every rank of the replica (tests, debugging).

    ``V`` is the model's vocabulary: the padding columns of a padded one are dropped.
    """
    g = shard.groups
    vocab = shard.spec.vocab_size

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return gather_vocab(out, g.tp, vocab)

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, vocab, torch.float32)


def forward_logprobs(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities [b, s-1] of each next token (position t scores token t+1), vocab-parallel."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    g = shard.groups

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        lp = vocab_parallel_logprobs(out[:, :-1] / temperature, mb.input_ids[:, 1:], g.tp)
        return torch.nn.functional.pad(lp, (0, 1))  # keep width s for the broadcast

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, None, torch.float32)[:, :-1]


def forward_values(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token values [b, s] of a value-head model."""
    if shard.spec.head != "value":
        raise ValueError(f"forward_values needs a value head; this model's head is {shard.spec.head!r}")

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return out.squeeze(-1).float()

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, None, torch.float32)
