"""Forward passes under any layout: logits, log-probabilities of the next tokens, values.

Each data-parallel replica processes the rows it is given; results end up on every rank of the
replica (all tensor and pipeline ranks), ready for the runtime to hand on. Masks and positions
come from :mod:`lightning_real.models.masks` (re-exported here).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lightning_real.models.masks import (
    attention_mask_4d,
    has_padding,
    model_mask,
    next_token_valid,
    position_ids,
)
from lightning_real.models.packing import SEGMENT_IDS, pack
from lightning_real.models.pipeline import MicroBatch, broadcast_from_last_stage, run_forward
from lightning_real.models.shard import ModelShard
from lightning_real.models.vocab_parallel import gather_vocab, next_token_logprobs

__all__ = [
    "attention_mask_4d",
    "forward_logits",
    "forward_logprobs",
    "forward_values",
    "microbatches",
    "model_mask",
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
    padded = has_padding(pad_mask)  # asked once per batch, not per microbatch (a host sync on CUDA)
    for idx in torch.arange(b).tensor_split(n_mbs):
        ids, pm = input_ids[idx], pad_mask[idx]
        seg = segment_ids[idx] if segment_ids is not None else None
        out.append(
            MicroBatch(
                ids,
                position_ids(pm, seg),
                model_mask(pm, seg, padded),
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
    token_budget: int | None = None,
) -> torch.Tensor:
    if shard.module is None:
        raise RuntimeError(f"rank {shard.groups.rank} is not in layout {shard.layout}; only its ranks run it")
    # Inputs may arrive on the CPU (from the data loader); the model's device is where they go.
    dev = next(shard.module.parameters()).device
    input_ids, pad_mask = input_ids.to(dev), pad_mask.to(dev)
    segment_ids = segment_ids.to(dev) if segment_ids is not None else None
    b, s = input_ids.shape
    packing = None
    if token_budget:
        rows, packing = pack({"input_ids": input_ids, "attention_mask": pad_mask}, token_budget)
        mbs = [
            MicroBatch(
                r["input_ids"],
                position_ids(r["attention_mask"], r[SEGMENT_IDS]),
                attention_mask_4d(r["attention_mask"], r[SEGMENT_IDS]),
                {},
            )
            for r in rows
        ]
    else:
        mbs = microbatches(input_ids, pad_mask, n_mbs, segment_ids)
    with torch.no_grad():
        parts = run_forward(shard, mbs, fn)
    shape = (b, s) if width is None else (b, s, width)
    value = None
    if shard.groups.is_last_stage:
        value = packing.unpack(parts) if packing is not None else torch.cat(parts, 0)
    return broadcast_from_last_stage(shard, value, shape, dtype)


def forward_logits(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
    token_budget: int | None = None,
) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V] on every rank of the replica (tests, debugging).

    ``V`` is the model's vocabulary: the padding columns of a padded one are dropped.
    """
    g = shard.groups
    vocab = shard.spec.vocab_size

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return gather_vocab(out, g.tp, vocab)

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, vocab, torch.float32, token_budget)


def forward_logprobs(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
    temperature: float = 1.0,
    token_budget: int | None = None,
) -> torch.Tensor:
    """Log-probabilities [b, s-1] of each next token (position t scores token t+1), vocab-parallel.

    ``token_budget``: run the rows packed into rows of at most that many tokens
    (:mod:`lightning_real.models.packing`); ``n_mbs`` is then ignored and an entry whose next
    token is padding is 0."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    g = shard.groups

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        logits = out if temperature == 1.0 else out / temperature  # no logit-sized copy at 1
        lp = next_token_logprobs(logits, mb.input_ids, g.tp)
        return torch.nn.functional.pad(lp, (0, 1))  # keep width s for the broadcast

    lp = _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, None, torch.float32, token_budget)[:, :-1]
    if token_budget:
        # a packed row's last token of a sequence is followed by the next sequence, not padding
        lp = lp * next_token_valid(pad_mask.to(lp.device), segment_ids).to(lp.dtype)
    return lp


def forward_values(
    shard: ModelShard,
    input_ids: torch.Tensor,
    pad_mask: torch.Tensor,
    n_mbs: int = 1,
    segment_ids: torch.Tensor | None = None,
    token_budget: int | None = None,
) -> torch.Tensor:
    """Per-token values [b, s] of a value-head model (0 on padding when packed by ``token_budget``)."""
    if shard.spec.head != "value":
        raise ValueError(f"forward_values needs a value head; this model's head is {shard.spec.head!r}")

    def fn(out: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        return out.squeeze(-1).float()

    return _run(shard, input_ids, pad_mask, n_mbs, segment_ids, fn, None, torch.float32, token_budget)
