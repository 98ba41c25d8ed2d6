"""Move batch rows from a producer call's data-parallel replicas to a consumer call's.

A call under layout ``L`` splits the global batch of ``B`` rows evenly over ``L.dp`` replicas;
every rank of a replica holds that replica's rows after the call. A consumer rank needs the rows
of its own replica: each overlapping row range comes from one producer rank, chosen locally when
the consumer rank itself holds it, otherwise spread over the producer replica's ranks. Only the
needed rows travel, point to point. Every rank computes the same plan, so no negotiation is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.layout import Layout, row_range

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool, torch.float64]
_HEADER = 8  # dtype code, ndim, up to 6 dims


def replica_ranks(layout: Layout, replica: int) -> list[int]:
    """All ranks of one data-parallel replica (tp x pp), in layout order."""
    return [layout.rank_at(replica, t, p) for p in range(layout.pp) for t in range(layout.tp)]


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` of the global batch sent from ``src`` to ``dst`` (equal ranks: a local copy)."""

    src: int
    dst: int
    lo: int
    hi: int


def plan_transfer(src: Layout, dst: Layout, batch_size: int) -> list[Piece]:
    """Pieces that give every rank of ``dst`` the rows of its replica, taken from ``src`` holders."""
    pieces: list[Piece] = []
    for e in range(dst.dp):
        a, b = row_range(batch_size, dst.dp, e)
        for i, r in enumerate(replica_ranks(dst, e)):
            for d in range(src.dp):
                lo, hi = row_range(batch_size, src.dp, d)
                lo, hi = max(lo, a), min(hi, b)
                if lo >= hi:
                    continue
                holders = replica_ranks(src, d)
                sender = r if r in holders else holders[i % len(holders)]
                pieces.append(Piece(sender, r, lo, hi))
    return pieces


def _header(t: torch.Tensor) -> torch.Tensor:
    if t.dim() > _HEADER - 2:
        raise ValueError(f"cannot transfer a {t.dim()}-d tensor (at most {_HEADER - 2} dims)")
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0] = _DTYPES.index(t.dtype)
    h[1] = t.dim()
    h[2 : 2 + t.dim()] = torch.tensor(t.shape)
    return h


def _cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate along rows, right-padding later dims with zeros (replicas may differ in length)."""
    if len(parts) == 1:
        return parts[0]
    shape = [max(p.shape[i] for p in parts) for i in range(1, parts[0].dim())]
    padded = []
    for p in parts:
        pad: list[int] = []
        for i in reversed(range(1, p.dim())):
            pad += [0, shape[i - 1] - p.shape[i]]
        padded.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return torch.cat(padded, 0)


def _tag(base: int, piece: int, msg: int) -> int:
    return base + piece * 64 + msg


def post_sends(
    tensors: dict[str, torch.Tensor] | None,
    src: Layout,
    dst: Layout,
    batch_size: int,
    rank: int,
    group: Any = None,
    tag_base: int = 0,
) -> tuple[list[Any], int]:
    """Start this rank's sends for a move (non-blocking); returns (handles to wait on, bytes).

    Messages are tagged, so the receiver may take them in any order relative to other moves;
    they travel as CPU tensors over ``group`` (a gloo group), which keeps the same code correct
    when the models themselves run on NCCL.
    """
    c = src.coords(rank)
    if c is None or tensors is None:
        return [], 0
    src_lo = row_range(batch_size, src.dp, c[0])[0]
    handles: list[Any] = []
    sent = 0
    for i, p in enumerate(plan_transfer(src, dst, batch_size)):
        if p.src != rank or p.dst == rank:
            continue
        for j, k in enumerate(sorted(tensors)):
            part = tensors[k][p.lo - src_lo : p.hi - src_lo].detach().to("cpu").contiguous()
            h = _header(part)
            handles.append((dist.isend(h, p.dst, group=group, tag=_tag(tag_base, i, 2 * j)), h))
            handles.append((dist.isend(part, p.dst, group=group, tag=_tag(tag_base, i, 2 * j + 1)), part))
            sent += part.numel() * part.element_size()
    return handles, sent


def receive(
    keys: list[str],
    held: dict[str, torch.Tensor] | None,
    src: Layout,
    dst: Layout,
    batch_size: int,
    rank: int,
    group: Any = None,
    tag_base: int = 0,
    device: torch.device | None = None,
) -> dict[str, torch.Tensor] | None:
    """This rank's rows of ``keys`` under ``dst`` (None outside it); ``held`` are its ``src`` rows."""
    c = dst.coords(rank)
    if c is None:
        return None
    sc = src.coords(rank)
    src_lo = row_range(batch_size, src.dp, sc[0])[0] if sc is not None else 0
    parts: list[dict[str, torch.Tensor]] = []
    for i, p in enumerate(plan_transfer(src, dst, batch_size)):
        if p.dst != rank:
            continue
        if p.src == rank:
            assert held is not None
            parts.append({k: held[k][p.lo - src_lo : p.hi - src_lo] for k in keys})
            continue
        got: dict[str, torch.Tensor] = {}
        for j, k in enumerate(sorted(keys)):
            h = torch.zeros(_HEADER, dtype=torch.int64)
            dist.recv(h, p.src, group=group, tag=_tag(tag_base, i, 2 * j))
            buf = torch.empty(h[2 : 2 + int(h[1])].tolist(), dtype=_DTYPES[int(h[0])])
            dist.recv(buf, p.src, group=group, tag=_tag(tag_base, i, 2 * j + 1))
            got[k] = buf if device is None else buf.to(device)
        parts.append(got)
    return {k: _cat_rows([q[k] for q in parts]) for k in keys}
