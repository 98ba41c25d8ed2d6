"""DAPO (Yu et al. 2025) sampling and reward shaping: dynamic sampling and the overlong penalty.

*Dynamic sampling*: a group whose responses all score the same has zero group-relative
advantage and teaches nothing, so DAPO drops it and samples more prompts until the batch holds
``target`` groups with some spread. :func:`keep_groups` says which groups stay,
:func:`refill_groups` appends the kept groups of one generation round to a buffer (and says
when it is full); the caller loops over generation rounds (at most ``max_gen_rounds``).

*Overlong reward shaping* (DAPO eq. 13): with the length limit ``L_max`` and a soft buffer
``L_cache`` before it, a response of ``|y|`` tokens gets::

    0                                   |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
    -1                                  L_max < |y|

added to its score (times ``factor``), a penalty that grows linearly over the buffer.

The clip-higher half of DAPO is ``clip_eps_high`` of
:class:`~lightning_real.algorithms.policy.PolicyLossConfig`, its token-level loss
``loss_agg='token-mean'``. Pure torch, rows in the layout of the rollout batches (a group's
``n`` responses in consecutive rows).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DAPOConfig:
    """DAPO's dynamic sampling and overlong shaping (both off by default)."""

    dynamic_sampling: bool = False
    """Drop groups whose scores are all equal and generate more until the batch is full."""
    max_gen_rounds: int = 10
    """Most generation rounds per training batch under dynamic sampling (verl's max_num_gen_batches);
    after them the batch is trained on as filled so far."""
    overlong_max_len: int | None = None
    """L_max of the overlong penalty (the response token limit); None: no overlong penalty."""
    overlong_cache: int = 0
    """L_cache: the soft buffer before L_max over which the penalty ramps from 0 to -1."""
    overlong_factor: float = 1.0
    """Scale of the overlong penalty (1.0: the paper's range [-1, 0])."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_gen_rounds, int) or self.max_gen_rounds < 1:
            raise ValueError(f"DAPOConfig.max_gen_rounds={self.max_gen_rounds!r}; allowed: an integer >= 1")
        if self.overlong_max_len is not None:
            if not isinstance(self.overlong_max_len, int) or self.overlong_max_len < 1:
                raise ValueError(
                    f"DAPOConfig.overlong_max_len={self.overlong_max_len!r}; allowed: an integer >= 1 or None"
                )
            if (
                not isinstance(self.overlong_cache, int)
                or not 0 < self.overlong_cache <= self.overlong_max_len
            ):
                raise ValueError(
                    f"DAPOConfig.overlong_cache={self.overlong_cache!r}; allowed: an integer in "
                    f"[1, overlong_max_len={self.overlong_max_len}]"
                )
        if not isinstance(self.overlong_factor, int | float) or self.overlong_factor < 0:
            raise ValueError(f"DAPOConfig.overlong_factor={self.overlong_factor!r}; allowed: a number >= 0")


# ---- dynamic sampling --------------------------------------------------------------------------
def keep_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B / group_size]`` bool: True for groups whose scores are not all equal (exact comparison)."""
    s = scores.float()
    if s.dim() != 1 or group_size < 1 or s.numel() % group_size:
        raise ValueError(
            f"keep_groups: scores of shape {tuple(s.shape)} do not split into groups of {group_size}"
        )
    g = s.view(-1, group_size)
    return g.max(-1).values > g.min(-1).values


def group_rows(keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group flags ``[G]`` -> per-row flags ``[G * group_size]``."""
    return keep.bool().repeat_interleave(group_size)


def select_rows(rows: Mapping[str, torch.Tensor], row_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The rows of every tensor in ``rows`` (first dim) where ``row_mask`` is True."""
    idx = row_mask.bool().nonzero().squeeze(-1)
    out: dict[str, torch.Tensor] = {}
    for k, v in rows.items():
        if v.shape[0] != row_mask.shape[0]:
            raise ValueError(f"select_rows: {k!r} has {v.shape[0]} rows, the mask {row_mask.shape[0]}")
        out[k] = v.index_select(0, idx.to(v.device))
    return out


def concat_rows(
    parts: Sequence[Mapping[str, torch.Tensor]], pad_values: Mapping[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """Stack the rows of batches with the same keys; tensors of different widths (dim 1) are padded
    on the *left* to the widest, with ``pad_values[key]`` (0 by default).

    Left padding keeps the rollout layout: prompts are left padded and responses end at the right
    edge of the same width, so a batch of wider prompts only shifts everything right.
    """
    if not parts:
        raise ValueError("concat_rows: no batches given")
    keys = list(parts[0])
    for p in parts[1:]:
        if list(p) != keys:
            raise ValueError(f"concat_rows: batches with different keys: {sorted(keys)} and {sorted(p)}")
    pads = pad_values or {}
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ts = [p[k] for p in parts]
        if ts[0].dim() >= 2:
            width = max(t.shape[1] for t in ts)
            ts = [_pad_left(t, width, pads.get(k, 0)) for t in ts]
        out[k] = torch.cat(ts, dim=0)
    return out


def _pad_left(t: torch.Tensor, width: int, value: float) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra == 0:
        return t
    pad = torch.full((t.shape[0], extra, *t.shape[2:]), value, dtype=t.dtype, device=t.device)
    return torch.cat([pad, t], dim=1)


def refill_groups(
    buffer: Mapping[str, torch.Tensor] | None,
    rows: Mapping[str, torch.Tensor],
    keep: torch.Tensor,
    group_size: int,
    target_groups: int,
    pad_values: Mapping[str, float] | None = None,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Append the kept groups of one generation round to ``buffer``; cut to ``target_groups``.

    ``rows`` holds ``len(keep) * group_size`` rows (whole groups, consecutive); ``keep`` is
    :func:`keep_groups` of their scores. Returns the new buffer (the first ``target_groups``
    kept groups, in the order they were generated) and whether it is full.
    """
    if target_groups < 1:
        raise ValueError(f"refill_groups: target_groups={target_groups!r}; allowed: an integer >= 1")
    kept = select_rows(rows, group_rows(keep, group_size))
    merged = kept if buffer is None else concat_rows([buffer, kept], pad_values)
    n = next(iter(merged.values())).shape[0] if merged else 0
    limit = target_groups * group_size
    if n > limit:
        merged = {k: v[:limit] for k, v in merged.items()}
        n = limit
    return merged, n == limit


# ---- overlong reward shaping ---------------------------------------------------------------------
def overlong_penalty(
    lengths: torch.Tensor, max_len: int, cache_len: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment per response ``[B]`` (see the module doc), times ``factor``."""
    if not 0 < cache_len <= max_len:
        raise ValueError(f"overlong_penalty: cache_len={cache_len} must be in [1, max_len={max_len}]")
    n = lengths.float()
    start = float(max_len - cache_len)
    ramp = (start - n) / float(cache_len)
    pen = torch.where(n <= start, torch.zeros_like(n), ramp)
    pen = torch.where(n > max_len, torch.full_like(n, -1.0), pen)
    return pen * factor
