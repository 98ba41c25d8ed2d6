"""Carry out one rank's part of a :class:`~lightning_real.realloc.plan.ReallocPlan` with torch.distributed.

Each rank copies its local pieces, then walks its rounds: pack the round's outgoing messages
into the send half of one staging buffer (a message that is one contiguous block of a parameter
is sent from the parameter itself), post every send and receive of the round
(``batch_isend_irecv``: NCCL on GPU, gloo on CPU), wait, and unpack the receive half into the
destination tensors (a contiguous block is received in place). The staging buffer is allocated
once per move and is at most ``plan.bucket_bytes``.

With ``async_op=True`` the work runs on a background thread (and, on CUDA, a side stream) so
the caller can compute meanwhile; the returned handle's :meth:`MoveHandle.wait` joins it.
Two moves must not run at once over the same group.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.compat import device, has_cuda
from lightning_real.realloc.geometry import KeyGeometry, key_geometry
from lightning_real.realloc.plan import Message, Piece, ReallocPlan

REALLOC_TAG = 7
"""gloo message tag of reallocation traffic (other traffic on the same group uses other tags)."""


@dataclass
class MoveStats:
    """What one rank did in one move."""

    bytes_sent: int = 0
    """Bytes this rank sent."""
    bytes_received: int = 0
    """Bytes this rank received."""
    bytes_local: int = 0
    """Bytes copied from this rank's source shard to its destination shard."""
    messages_sent: int = 0
    """Messages this rank sent."""
    rounds: int = 0
    """Rounds this rank took part in."""
    staging_bytes: int = 0
    """Size of the staging buffer this rank allocated."""
    seconds: float = 0.0
    """Wall time of the move on this rank."""
    copy_seconds: float = 0.0
    """Part of it spent copying: local pieces, packing and unpacking messages."""
    wait_seconds: float = 0.0
    """Part of it spent waiting for messages to go out and come in."""
    sent_to: dict[int, int] = field(default_factory=dict)
    """Bytes this rank sent to each receiving rank (where the bytes went, e.g. across nodes)."""


class MoveHandle:
    """A move in progress (or finished); :meth:`wait` returns its stats and re-raises its error."""

    def __init__(
        self,
        thread: threading.Thread | None,
        box: dict[str, Any],
        after: Callable[[MoveStats], None] | None,
    ) -> None:
        self._thread = thread
        self._box = box
        self._after = after

    @classmethod
    def finished(cls, stats: MoveStats) -> MoveHandle:
        """A handle of a move with nothing to do."""
        return cls(None, {"stats": stats}, None)

    def done(self) -> bool:
        """Whether the move has finished."""
        return self._thread is None or not self._thread.is_alive()

    def wait(self) -> MoveStats:
        """Block until the move is complete on this rank."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if "error" in self._box:
            raise self._box.pop("error")
        stats: MoveStats = self._box["stats"]
        if self._after is not None:
            after, self._after = self._after, None
            after(stats)
        return stats


def _local_view(t: torch.Tensor, g: KeyGeometry, tp: int) -> torch.Tensor:
    """``t`` (one rank's parameter) viewed in plan coordinates."""
    return t.view(g.local_view_shape(tp))


def _rows(view: torch.Tensor, p: Piece, origin: int) -> torch.Tensor:
    return view.narrow(p.dim, p.lo - origin, p.hi - p.lo)


def _pack(
    m: Message, src: dict[str, torch.Tensor], geo: dict[str, KeyGeometry], tp: int, buf: torch.Tensor
) -> torch.Tensor:
    """The flat tensor to send for ``m``: the source rows themselves when contiguous, else packed."""
    if m.direct_send:
        p = m.pieces[0]
        return _rows(_local_view(src[p.key], geo[p.key], tp), p, p.src_lo)
    off = 0
    for p in m.pieces:
        part = _rows(_local_view(src[p.key], geo[p.key], tp), p, p.src_lo)
        n = part.numel()
        buf[off : off + n].view(part.shape).copy_(part)
        off += n
    return buf[:off]


def _unpack(
    m: Message, dst: dict[str, torch.Tensor], geo: dict[str, KeyGeometry], tp: int, buf: torch.Tensor
) -> None:
    """Scatter a received flat buffer into the destination rows."""
    off = 0
    for p in m.pieces:
        part = _rows(_local_view(dst[p.key], geo[p.key], tp), p, p.dst_lo)
        n = part.numel()
        part.copy_(buf[off : off + n].view(part.shape))
        off += n


def _run(
    plan: ReallocPlan,
    rank: int,
    src: dict[str, torch.Tensor],
    dst: dict[str, torch.Tensor],
    group: Any,
    stats: MoveStats,
) -> None:
    t0 = time.perf_counter()
    rp = plan.for_rank(rank)
    geo = key_geometry(plan.spec)
    ts, td = plan.src.tp, plan.dst.tp
    with torch.no_grad():
        tc = time.perf_counter()
        for p in rp.local:
            g = geo[p.key]
            _rows(_local_view(dst[p.key], g, td), p, p.dst_lo).copy_(
                _rows(_local_view(src[p.key], g, ts), p, p.src_lo)
            )
        stats.bytes_local = rp.bytes_local
        stats.copy_seconds += time.perf_counter() - tc
        if rp.steps:
            some = next(iter(dst.values()), None)
            if some is None:
                some = next(iter(src.values()))
            esize = plan.element_size
            out_n, in_n = rp.send_staging_bytes // esize, rp.recv_staging_bytes // esize
            staging = torch.empty(out_n + in_n, dtype=some.dtype, device=some.device)
            stats.staging_bytes = staging.numel() * esize
            send_buf, recv_buf = staging[:out_n], staging[out_n:]
            for step in rp.steps:
                tc = time.perf_counter()
                ops = []
                off = 0
                for m in step.sends:
                    buf = _pack(m, src, geo, ts, send_buf[off:])
                    off += 0 if m.direct_send else buf.numel()
                    ops.append(dist.P2POp(dist.isend, buf, m.dst, group, REALLOC_TAG))
                    stats.bytes_sent += m.nbytes
                    stats.messages_sent += 1
                    stats.sent_to[m.dst] = stats.sent_to.get(m.dst, 0) + m.nbytes
                off = 0
                landing = []
                for m in step.recvs:
                    if m.direct_recv:
                        p = m.pieces[0]
                        buf = _rows(_local_view(dst[p.key], geo[p.key], td), p, p.dst_lo)
                    else:
                        buf = recv_buf[off : off + m.nbytes // esize]
                        off += buf.numel()
                        landing.append((m, buf))
                    ops.append(dist.P2POp(dist.irecv, buf, m.src, group, REALLOC_TAG))
                    stats.bytes_received += m.nbytes
                tw = time.perf_counter()
                for req in dist.batch_isend_irecv(ops):
                    req.wait()
                tu = time.perf_counter()
                for m, buf in landing:
                    _unpack(m, dst, geo, td, buf)
                stats.copy_seconds += (tw - tc) + (time.perf_counter() - tu)
                stats.wait_seconds += tu - tw
            stats.rounds = len(rp.steps)
            del staging, send_buf, recv_buf
    stats.seconds = time.perf_counter() - t0


def execute(
    plan: ReallocPlan,
    rank: int,
    src: dict[str, torch.Tensor],
    dst: dict[str, torch.Tensor],
    group: Any = None,
    async_op: bool = False,
    after: Callable[[MoveStats], None] | None = None,
) -> MoveHandle:
    """Run ``rank``'s part of ``plan``.

    ``src`` and ``dst`` map canonical keys to this rank's parameter tensors under the source and
    destination layouts (empty where the rank is outside a layout); ``dst`` tensors are written in
    place. ``group`` carries the messages (default: the world); every rank of the plan must call
    this with the same plan. ``after(stats)`` runs on the caller's thread once the move is
    complete (to free the source, for example). Call the handle's :meth:`MoveHandle.wait`.
    """
    box: dict[str, Any] = {"stats": MoveStats()}
    if not async_op:
        _run(plan, rank, src, dst, group, box["stats"])
        return MoveHandle(None, box, after)

    stream = torch.cuda.Stream() if has_cuda() else None
    if stream is not None:
        # Parameters were last written on the caller's stream.
        stream.wait_stream(torch.cuda.current_stream())
    dev = device()

    def body() -> None:
        try:
            if stream is not None:
                torch.cuda.set_device(dev)  # the current device is per thread
                with torch.cuda.stream(stream):
                    _run(plan, rank, src, dst, group, box["stats"])
                stream.synchronize()
            else:
                _run(plan, rank, src, dst, group, box["stats"])
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=body, name=f"realloc-{rank}", daemon=True)
    thread.start()
    return MoveHandle(thread, box, after)
