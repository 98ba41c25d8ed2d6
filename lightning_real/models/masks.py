"""Attention masks and position ids for padded and packed batches.

A batch row holds one left- or right-padded sequence, or several sequences packed one after
another (``segment_ids`` tells them apart). ``pad_mask`` is 1 on real tokens and 0 on padding.
"""

from __future__ import annotations

import torch


def _check(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> None:
    if pad_mask.dim() != 2:
        raise ValueError(f"pad_mask must be [batch, seq], got shape {tuple(pad_mask.shape)}")
    if segment_ids is not None and segment_ids.shape != pad_mask.shape:
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids.shape)} must equal pad_mask shape {tuple(pad_mask.shape)}"
        )


def attention_mask_4d(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """megatron-core's boolean mask ``[b, 1, s, s]``: True where a query may NOT see a key.

    A query sees earlier-or-equal real keys of its own segment. Every token also sees itself,
    so padding rows are never fully masked (a fully masked softmax row is NaN in some kernels).
    """
    _check(pad_mask, segment_ids)
    s = pad_mask.shape[1]
    real = pad_mask.bool()
    causal = torch.ones(s, s, dtype=torch.bool, device=pad_mask.device).tril()
    allowed = causal & real[:, None, :]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=pad_mask.device)
    return ~allowed[:, None]


def model_mask(
    pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None, padded: bool | None = None
) -> torch.Tensor | None:
    """The mask to hand the model: :func:`attention_mask_4d`, or None for a plainly causal batch.

    A batch without padding or packed segments needs nothing beyond causality: SDPA then takes
    its causal kernels (on CUDA the flash kernel, which takes no explicit mask) and megatron's
    local attention builds its own causal mask, so no ``[b, 1, s, s]`` tensor is made or kept.
    ``padded``: whether the batch holds padding, when the caller has asked once for the whole
    batch (:func:`has_padding`); None asks here (a host sync on an accelerator).
    """
    _check(pad_mask, segment_ids)
    if padded is None:
        padded = has_padding(pad_mask)
    if segment_ids is None and not padded:
        return None
    return attention_mask_4d(pad_mask, segment_ids)


def has_padding(pad_mask: torch.Tensor | None) -> bool:
    """Whether any position of ``pad_mask`` (1 = token; None: no mask) is padding."""
    return pad_mask is not None and not bool(pad_mask.bool().all())


def segment_starts(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[b, s]``: True where a new segment begins (always at position 0)."""
    _check(pad_mask, segment_ids)
    starts = torch.zeros(pad_mask.shape, dtype=torch.bool, device=pad_mask.device)
    starts[:, 0] = True
    if segment_ids is not None:
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return starts


def position_ids(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Position of each token among the real tokens of its segment, int64 ``[b, s]``.

    Left padding does not shift positions (the first real token is at 0, as if unpadded);
    padding takes the position of the previous real token of its segment (0 if none).
    """
    real = pad_mask.long()
    upto = real.cumsum(1)  # real tokens up to and including each position
    before = upto - real
    # Real tokens before the current segment's start, carried forward (monotone, so cummax works).
    at_start = torch.where(segment_starts(pad_mask, segment_ids), before, torch.zeros_like(before))
    return (upto - at_start.cummax(1).values - 1).clamp(min=0)


def next_token_valid(pad_mask: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Bool ``[b, s-1]``: position i predicts a real token i+1 of the same segment from a real token."""
    real = pad_mask.bool()
    valid = real[:, :-1] & real[:, 1:]
    if segment_ids is not None:
        valid &= segment_ids[:, 1:] == segment_ids[:, :-1]
    return valid
