"""Packed sequences: a padded batch's rows concatenated into rows of at most a token budget.

A padded batch spends compute on padding; packing keeps only the real tokens. The rows of a
batch (left- or right-padded, ``attention_mask`` 1 on real tokens) are placed into *bins* of at
most ``budget`` tokens (first fit, longest rows first, deterministic), and each bin becomes one
packed row: its rows' real tokens back to back, ``segment_ids`` telling them apart (attention
stays within a segment, positions restart per segment; :mod:`lightning_real.models.masks`).

Keys are packed by their width: ``[B, S]`` keys token by token, ``[B, S - 1]`` keys (entry ``t``
scores token ``t + 1``: log-probabilities, action masks, advantages) as if padded to ``S`` with
a zero, so each packed row keeps the same convention. The last real token of a sequence has no
next token of its own (its next one in a packed row is the next segment's first), and its entry
is that zero: masks built from the padded batch are 0 there, so token losses and their gradients
are those of the padded batch. Per-sequence keys (``[B]``) cannot be packed token-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Batch = dict[str, torch.Tensor]

ATTENTION_MASK = "attention_mask"
SEGMENT_IDS = "segment_ids"


@dataclass(frozen=True)
class Packing:
    """Which rows went into which packed row, and where their real tokens came from."""

    bins: tuple[tuple[int, ...], ...]
    """Row indices of the padded batch in each packed row, in order."""
    positions: tuple[torch.Tensor, ...]
    """Per packed row: the flat indices (``row * S + column``) of its real tokens."""
    shape: tuple[int, int]
    """``(B, S)`` of the padded batch."""

    def unpack(self, packed: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
        """``[B, S]`` (or ``[B, S, ...]``) from one ``[1, L_i, ...]`` result per packed row; padding ``fill``."""
        b, s = self.shape
        first = packed[0]
        out = first.new_full((b * s, *first.shape[2:]), fill)
        for pos, part in zip(self.positions, packed, strict=True):
            out[pos.to(out.device)] = part[0]
        return out.view(b, s, *first.shape[2:])


def bins(lengths: list[int], budget: int) -> list[list[int]]:
    """Rows per bin: first fit over rows sorted by decreasing length (ties by index); a row
    longer than ``budget`` gets a bin of its own."""
    if budget < 1:
        raise ValueError(f"token budget={budget}; allowed: an integer >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        for k, r in enumerate(room):
            if n <= r:
                out[k].append(i)
                room[k] -= n
                break
        else:
            out.append([i])
            room.append(budget - n)
    return [sorted(b) for b in out]


def pack(batch: Batch, budget: int) -> tuple[list[Batch], Packing]:
    """The packed rows of ``batch`` (one ``[1, L]`` batch each, with ``segment_ids``) and how to undo it."""
    if ATTENTION_MASK not in batch:
        raise KeyError(f"packing needs '{ATTENTION_MASK}' (1 on real tokens); the batch has {sorted(batch)}")
    if SEGMENT_IDS in batch:
        raise ValueError("rows that already hold several segments (segment_ids) cannot be packed again")
    mask = batch[ATTENTION_MASK].bool()
    b, s = mask.shape
    wide: Batch = {}
    for k, v in batch.items():
        if v.dim() < 2 or v.shape[0] != b or v.shape[1] not in (s, s - 1):
            raise ValueError(
                f"packing needs per-token keys ([B, S] or [B, S - 1]); {k!r} has shape {tuple(v.shape)}"
            )
        wide[k] = v if v.shape[1] == s else torch.nn.functional.pad(v, (0, 1))
    lengths = [int(n) for n in mask.sum(1).tolist()]
    groups = bins(lengths, budget)
    index = torch.arange(b * s, device=mask.device).view(b, s)
    rows: list[Batch] = []
    positions: list[torch.Tensor] = []
    for members in groups:
        pos = torch.cat([index[r][mask[r]] for r in members])
        seg = torch.cat(
            [
                torch.full((lengths[r],), j, dtype=torch.long, device=mask.device)
                for j, r in enumerate(members)
            ]
        )
        row: Batch = {}
        for k, v in wide.items():
            flat = v.reshape(b * s, *v.shape[2:])[pos].unsqueeze(0)
            # a [B, S - 1] key keeps its width convention: entry t of L scores token t + 1
            row[k] = flat[:, :-1] if batch[k].shape[1] == s - 1 else flat
        row[SEGMENT_IDS] = seg.unsqueeze(0)
        rows.append(row)
        positions.append(pos)
    return rows, Packing(tuple(tuple(m) for m in groups), tuple(positions), (b, s))
