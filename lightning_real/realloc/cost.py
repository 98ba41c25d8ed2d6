"""Byte totals of a move, computed analytically: what the planner's search prices moves with.

:func:`plan_realloc` lists every piece of every tensor, which for a 70B model on 128 GPUs is
tens of thousands of pieces. The totals need far less: tensors held by the same source stages
and the same destination stages, and split (or replicated) alike, behave identically up to their
size, so each such *class* is worked out once, in units of ``1 / lcm(tp_src, tp_dst)`` of the
split dimension, and scaled by the class's total size. The rules are the plan's own (a local
copy where the destination rank holds the bytes, a sender on the receiver's node when one
holds them), so the totals agree with :func:`plan_realloc` exactly; a test checks this.
Vocabulary rows are counted one row at a time: a padded vocabulary's chunk edges depend on each
layout's padding, not on a common fraction of the tensor.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache

from lightning_real.layout import Layout
from lightning_real.models.spec import ModelSpec
from lightning_real.realloc.geometry import check_layout, key_geometry, stage_keys


@dataclass(frozen=True)
class ReallocCost:
    """What moving one model between two layouts costs, in bytes."""

    bytes_sent: int
    """Bytes that cross between ranks (equal to ``lower_bound_bytes``: the plan is minimal)."""
    bytes_local: int
    """Bytes a destination rank copies from its own source shard."""
    lower_bound_bytes: int
    """Destination shard bytes not held by the same rank in the source layout."""
    bytes_cross_node: int
    """Bytes that must cross nodes because no holder shares the receiver's node."""
    max_recv_bytes: int
    """Most bytes any one rank receives (the receiving side of the slowest rank)."""
    recv_by_rank: tuple[tuple[int, int], ...]
    """``(rank, bytes received)`` for every destination rank that receives something."""


@lru_cache(maxsize=1024)
def _stage_sets(spec: ModelSpec, pp: int) -> dict[str, tuple[int, ...]]:
    """Pipeline stages holding each canonical key."""
    out: dict[str, list[int]] = defaultdict(list)
    for s in range(pp):
        for k in stage_keys(spec, pp, s):
            out[k].append(s)
    return {k: tuple(v) for k, v in out.items()}


# (source stages, destination stages, split, (rows, pad multiple) of a vocabulary or None)
ClassKey = tuple[tuple[int, ...], tuple[int, ...], bool, tuple[int, int] | None]


@lru_cache(maxsize=4096)
def _classes(spec: ModelSpec, src_pp: int, dst_pp: int, units: int, element_size: int) -> dict[ClassKey, int]:
    """Tensors grouped by class -> bytes of one unit.

    A unit is ``1 / units`` of the split dimension, the whole tensor when it is replicated, or
    one row of a vocabulary matrix.
    """
    src_st, dst_st = _stage_sets(spec, src_pp), _stage_sets(spec, dst_pp)
    out: dict[ClassKey, int] = defaultdict(int)
    for key, g in key_geometry(spec).items():
        stages = (src_st[key], dst_st[key])
        if g.pad_multiple is not None:
            out[(*stages, True, (g.length, g.pad_multiple))] += g.row_elems * element_size
            continue
        n = units if g.split else 1
        out[(*stages, g.split, None)] += (g.length // n) * g.row_elems * element_size
    return dict(out)


def _grid(
    split: bool, vocab: tuple[int, int] | None, units: int, src: Layout, dst: Layout
) -> tuple[int, int, int]:
    """(units in the tensor, units per source chunk, units per destination chunk) of a class."""
    if vocab is not None:
        rows, m = vocab
        per_rank = [-(-rows // (m * tp)) * m for tp in (src.tp, dst.tp)]
        return rows, per_rank[0], per_rank[1]
    if split:
        return units, units // src.tp, units // dst.tp
    return 1, 1, 1


@lru_cache(maxsize=4096)
def realloc_bytes(
    spec: ModelSpec, src: Layout, dst: Layout, gpus_per_node: int = 8, element_size: int = 4
) -> ReallocCost:
    """Byte totals of moving ``spec`` from ``src`` to ``dst`` (resolved layouts), without a plan."""
    check_layout(spec, src, "source")
    check_layout(spec, dst, "destination")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node!r}; allowed: a positive integer")
    L = math.lcm(src.tp, dst.tp)
    classes = _classes(spec, src.pp, dst.pp, L, element_size)
    sent = local = cross = 0
    recv: dict[int, int] = defaultdict(int)
    src_ranks, dst_ranks = src.ranks or (), dst.ranks or ()
    for (s_stages, d_stages, split, vocab), unit_bytes in classes.items():
        n, ws, wd = _grid(split, vocab, L, src, dst)
        # Which (source chunk, node) pairs have a holder, and each source rank's chunk.
        held: set[tuple[int, int]] = set()
        own: dict[int, int] = {}
        for s in s_stages:
            for i in range(s * src.dp * src.tp, (s + 1) * src.dp * src.tp):
                r, j = src_ranks[i], (i % src.tp if split else 0)
                held.add((j, r // gpus_per_node))
                own[r] = j
        for s in d_stages:
            for i in range(s * dst.dp * dst.tp, (s + 1) * dst.dp * dst.tp):
                r = dst_ranks[i]
                # Clipped: a padded vocabulary's last chunks end at (or lie past) its last row.
                a, b = (min((i % dst.tp) * wd, n), min((i % dst.tp + 1) * wd, n)) if split else (0, 1)
                j_own = own.get(r)
                mine = 0
                if j_own is not None:
                    mine = max(0, min(b, (j_own + 1) * ws) - max(a, j_own * ws))
                local += mine * unit_bytes
                need = (b - a - mine) * unit_bytes
                if not need:
                    continue
                sent += need
                recv[r] += need
                node = r // gpus_per_node
                # Only the source chunks overlapping [a, b) can hold what this rank needs.
                for j in range(a // ws, (b - 1) // ws + 1):
                    if j != j_own and (j, node) not in held:
                        cross += (min(b, (j + 1) * ws) - max(a, j * ws)) * unit_bytes
    return ReallocCost(
        bytes_sent=sent,
        bytes_local=local,
        lower_bound_bytes=sent,
        bytes_cross_node=cross,
        max_recv_bytes=max(recv.values(), default=0),
        recv_by_rank=tuple(sorted(recv.items())),
    )
