"""Forward passes under any layout: logits, log-probabilities of the next tokens, values.

Each data-parallel replica processes the rows it is given; results end up on every rank of the
replica (all tensor and pipeline ranks), ready for the runtime to hand on.
"""

from __future__ import annotations

import torch

from lightning_real.models.pipeline import MicroBatch, broadcast_from_last_stage, run_forward
from lightning_real.models.shard import ModelShard
from lightning_real.models.vocab_parallel import gather_vocab, vocab_parallel_logprobs


def attention_mask_4d(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """megatron's bool mask [b, 1, s, s] (True = masked): causal, padding, and packed segments."""
    s = pad_mask.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=pad_mask.device).tril()
    keep = causal[None] & pad_mask.bool()[:, None, :]
    if segment_ids is not None:
        keep = keep & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return ~keep[:, None]


def position_ids(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Positions counting real tokens only (left padding), restarting at each packed segment."""
    m = pad_mask.long()
    if segment_ids is None:
        return (m.cumsum(-1) - 1).clamp(min=0)
    pos = torch.zeros_like(m)
    for seg in segment_ids.unique().tolist():
        if seg == 0:
            continue
        inside = (segment_ids == seg).long() * m
        pos = pos + ((inside.cumsum(-1) - 1).clamp(min=0)) * inside
    return pos


def microbatches(
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int,
    segment_ids: torch.Tensor | None = None,
    extra: dict[str, torch.Tensor] | None = None,
) -> list[MicroBatch]:
    """Split rows into ``n_mbs`` microbatches (as even as possible)."""
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
    shard: ModelShard, input_ids, pad_mask, n_mbs, segment_ids, fn, width: int | None, dtype
) -> torch.Tensor:
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
    """Full-vocabulary logits [b, s, V] on every rank of the replica (tests, debugging)."""
    g = shard.groups

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return gather_vocab(out, g.tp)

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, shard.spec.vocab_size, torch.float32)


def forward_logprobs(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities [b, s-1] of each next token (position t scores token t+1), vocab-parallel."""
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
