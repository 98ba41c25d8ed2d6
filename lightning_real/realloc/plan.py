"""The reallocation plan: which bytes each destination rank copies locally or receives, from whom.

:func:`plan_realloc` is pure Python (no process groups, no tensors) so the planner can price a
move and every rank can derive the same plan on its own. It works in canonical coordinates
(:mod:`lightning_real.realloc.geometry`):

1. for every canonical key and every destination rank, the slice ``D`` the rank must hold;
2. the part of ``D`` the rank already holds under the source layout is a *local* piece;
3. the rest is cut at the source tensor-parallel chunk boundaries; each cut piece is sent by one
   source rank holding it: one on the receiver's node if any, else any, the least loaded so far
   (ties go to the first holder at or after the receiver's rank, which spreads equal loads);
4. pieces between one (sender, receiver) pair are packed in order into *messages* (flat
   buffers) of at most ``bucket_bytes // 2`` bytes; a large piece travels alone;
5. messages are scheduled in *rounds*: in a round a rank packs at most half a bucket of outgoing
   and unpacks at most half a bucket of incoming messages; a message that is one contiguous
   piece of a parameter on its side needs no staging there (it is sent from, or received into,
   the parameter itself). Every rank walks the same rounds and posts a round's messages in plan
   order, so matching sends and receives line up and nothing waits on a rank outside the move.

Every destination byte is covered exactly once, so the bytes sent equal the lower bound: the
destination shard bytes that the destination rank does not hold in the source layout.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache

from lightning_real.layout import Layout
from lightning_real.models.spec import ModelSpec
from lightning_real.realloc.geometry import KeyGeometry, check_layout, holdings, key_geometry

MiB = 1 << 20
DEFAULT_BUCKET_BYTES = 64 * MiB


@dataclass(frozen=True)
class Piece:
    """Rows ``[lo, hi)`` along ``dim`` of the view of canonical tensor ``key``, from ``src`` to ``dst``."""

    key: str
    """Canonical tensor."""
    dim: int
    """Dimension of the view the rows run along."""
    lo: int
    """First row (canonical view coordinates)."""
    hi: int
    """End row, exclusive."""
    src: int
    """Global rank that reads the rows from its source shard."""
    dst: int
    """Global rank that writes them into its destination shard (``== src``: a local copy)."""
    src_lo: int
    """Where the source rank's slice of the view starts (``lo - src_lo`` indexes its local tensor)."""
    dst_lo: int
    """Where the destination rank's slice of the view starts."""
    nbytes: int
    """Bytes of the piece."""


@dataclass(frozen=True)
class Message:
    """One flat buffer sent from ``src`` to ``dst`` in round ``round``: the pieces back to back."""

    src: int
    """Sending global rank."""
    dst: int
    """Receiving global rank."""
    pieces: tuple[Piece, ...]
    """Contents, in buffer order."""
    nbytes: int
    """Buffer size in bytes."""
    round: int = -1
    """Round it is sent in (set by the scheduler)."""
    direct_send: bool = False
    """One piece that is contiguous in the sender's tensor: sent from it without packing."""
    direct_recv: bool = False
    """One piece that is contiguous in the receiver's tensor: received into it without unpacking."""


@dataclass(frozen=True)
class Step:
    """What one rank does in one round: everything is posted at once, then awaited."""

    round: int
    """Round index."""
    sends: tuple[Message, ...]
    """Messages this rank sends (packed ones fill at most half a bucket together)."""
    recvs: tuple[Message, ...]
    """Messages this rank receives (packed ones fill at most half a bucket together)."""

    @property
    def send_staging_bytes(self) -> int:
        """Bytes of the outgoing messages that are packed into the staging buffer."""
        return sum(m.nbytes for m in self.sends if not m.direct_send)

    @property
    def recv_staging_bytes(self) -> int:
        """Bytes of the incoming messages that land in the staging buffer."""
        return sum(m.nbytes for m in self.recvs if not m.direct_recv)


@dataclass(frozen=True)
class RankPlan:
    """The part of a plan one rank executes."""

    rank: int
    """Global rank."""
    local: tuple[Piece, ...]
    """Copies from this rank's source shard into its destination shard."""
    steps: tuple[Step, ...]
    """Rounds this rank takes part in, in order."""

    @property
    def send_staging_bytes(self) -> int:
        """Staging for outgoing messages: the most any one round packs."""
        return max((s.send_staging_bytes for s in self.steps), default=0)

    @property
    def recv_staging_bytes(self) -> int:
        """Staging for incoming messages: the most any one round unpacks."""
        return max((s.recv_staging_bytes for s in self.steps), default=0)

    @property
    def staging_bytes(self) -> int:
        """Staging memory the rank needs (at most ``bucket_bytes``)."""
        return self.send_staging_bytes + self.recv_staging_bytes

    @property
    def bytes_sent(self) -> int:
        """Bytes this rank sends."""
        return sum(m.nbytes for s in self.steps for m in s.sends)

    @property
    def bytes_received(self) -> int:
        """Bytes this rank receives."""
        return sum(m.nbytes for s in self.steps for m in s.recvs)

    @property
    def bytes_local(self) -> int:
        """Bytes this rank copies from its own source shard."""
        return sum(p.nbytes for p in self.local)


@dataclass(frozen=True)
class ReallocPlan:
    """A complete move of one model from ``src`` to ``dst`` (every rank's part of it)."""

    spec: ModelSpec
    """The model moved."""
    src: Layout
    """Source layout (resolved)."""
    dst: Layout
    """Destination layout (resolved)."""
    element_size: int
    """Bytes per parameter element."""
    bucket_bytes: int
    """Staging memory per rank: in a round, half for packed outgoing and half for incoming messages."""
    gpus_per_node: int
    """Ranks per node (rank // gpus_per_node is the node)."""
    local: tuple[Piece, ...]
    """All local copies."""
    messages: tuple[Message, ...]
    """All messages, ordered by round."""
    num_rounds: int
    """Rounds of the schedule."""
    lower_bound_bytes: int
    """Sum over destination ranks of destination shard bytes the rank does not hold in the source."""
    dst_shard_bytes: dict[int, int] = field(repr=False)
    """Destination shard size of each destination rank."""

    @cached_property
    def bytes_sent(self) -> int:
        """Bytes that cross between ranks."""
        return sum(m.nbytes for m in self.messages)

    @cached_property
    def bytes_local(self) -> int:
        """Bytes copied within a rank."""
        return sum(p.nbytes for p in self.local)

    @cached_property
    def bytes_cross_node(self) -> int:
        """Bytes sent between different nodes."""
        g = self.gpus_per_node
        return sum(m.nbytes for m in self.messages if m.src // g != m.dst // g)

    @cached_property
    def sent_by_rank(self) -> dict[int, int]:
        """Bytes each rank sends."""
        out: dict[int, int] = defaultdict(int)
        for m in self.messages:
            out[m.src] += m.nbytes
        return dict(out)

    @cached_property
    def received_by_rank(self) -> dict[int, int]:
        """Bytes each rank receives."""
        out: dict[int, int] = defaultdict(int)
        for m in self.messages:
            out[m.dst] += m.nbytes
        return dict(out)

    @property
    def max_send_bytes(self) -> int:
        """Largest number of bytes any one rank sends."""
        return max(self.sent_by_rank.values(), default=0)

    @property
    def max_recv_bytes(self) -> int:
        """Largest number of bytes any one rank receives."""
        return max(self.received_by_rank.values(), default=0)

    @property
    def ranks(self) -> tuple[int, ...]:
        """Every rank that takes part (source or destination)."""
        return tuple(sorted(set(self.src.ranks or ()) | set(self.dst.ranks or ())))

    def for_rank(self, rank: int) -> RankPlan:
        """This rank's local copies and rounds (empty for ranks outside both layouts)."""
        return _rank_plan(self, rank)

    # Plans are cached and compared by identity: comparing thousands of pieces would be wasted work.
    def __hash__(self) -> int:
        return hash((self.spec, self.src, self.dst, self.element_size, self.bucket_bytes, self.gpus_per_node))

    def __eq__(self, other: object) -> bool:
        return self is other


@lru_cache(maxsize=4096)
def _rank_plan(plan: ReallocPlan, rank: int) -> RankPlan:
    local = tuple(p for p in plan.local if p.dst == rank)
    by_round: dict[int, tuple[list[Message], list[Message]]] = {}
    for m in plan.messages:  # plan order: both ends of a pair see its messages in one order
        if m.src == rank:
            by_round.setdefault(m.round, ([], []))[0].append(m)
        if m.dst == rank:
            by_round.setdefault(m.round, ([], []))[1].append(m)
    steps = tuple(Step(r, tuple(s), tuple(v)) for r, (s, v) in sorted(by_round.items()))
    return RankPlan(rank, local, steps)


def _subtract(a: int, b: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """``[a, b)`` minus ``[lo, hi)`` as up to two ranges."""
    out = []
    if lo > a:
        out.append((a, min(b, lo)))
    if hi < b:
        out.append((max(a, hi), b))
    return [(x, y) for x, y in out if x < y]


def _pieces(
    spec: ModelSpec, src: Layout, dst: Layout, element_size: int, gpus_per_node: int
) -> tuple[list[Piece], list[Piece], dict[int, int]]:
    """Local and remote pieces of the move, and each destination rank's shard bytes."""
    geo = key_geometry(spec)
    src_h, dst_h = holdings(spec, src), holdings(spec, dst)
    load: dict[int, int] = defaultdict(int)
    span = 1 + max((*(src.ranks or ()), *(dst.ranks or ())))
    local: list[Piece] = []
    remote: list[Piece] = []
    shard_bytes: dict[int, int] = defaultdict(int)
    for key, g in geo.items():
        row_bytes = g.row_elems * element_size
        own = {h.rank: h for h in src_h[key]}
        # Source holders by chunk: every dp replica (and every tp rank of a replicated tensor).
        chunks: dict[tuple[int, int], list[int]] = {}
        for h in src_h[key]:
            chunks.setdefault((h.lo, h.hi), []).append(h.rank)
        for d in dst_h[key]:
            shard_bytes[d.rank] += (d.hi - d.lo) * row_bytes
            rest = [(d.lo, d.hi)]
            mine = own.get(d.rank)
            if mine is not None:
                lo, hi = max(d.lo, mine.lo), min(d.hi, mine.hi)
                if lo < hi:
                    nb = (hi - lo) * row_bytes
                    local.append(Piece(key, g.dim, lo, hi, d.rank, d.rank, mine.lo, d.lo, nb))
                    rest = _subtract(d.lo, d.hi, lo, hi)
            for a, b in rest:
                for (clo, chi), cands in chunks.items():
                    lo, hi = max(a, clo), min(b, chi)
                    if lo >= hi:
                        continue
                    node = d.rank // gpus_per_node
                    pool = [c for c in cands if c // gpus_per_node == node] or cands
                    sender = min((load[c], (c - d.rank) % span, c) for c in pool)[2]
                    nb = (hi - lo) * row_bytes
                    load[sender] += nb
                    remote.append(Piece(key, g.dim, lo, hi, sender, d.rank, clo, d.lo, nb))
    return local, remote, dict(shard_bytes)


def _split(p: Piece, rows: int, g: KeyGeometry, element_size: int) -> tuple[Piece, Piece]:
    """``p`` cut after its first ``rows`` rows."""
    rb = g.row_elems * element_size
    cut = p.lo + rows
    a = Piece(p.key, p.dim, p.lo, cut, p.src, p.dst, p.src_lo, p.dst_lo, rows * rb)
    b = Piece(p.key, p.dim, cut, p.hi, p.src, p.dst, p.src_lo, p.dst_lo, p.nbytes - rows * rb)
    return a, b


def _contiguous(p: Piece, g: KeyGeometry, start: int, width: int) -> bool:
    """Whether rows ``[p.lo, p.hi)`` are one contiguous block of a tensor holding ``[start, start+width)``."""
    return math.prod(g.view_shape[: g.dim]) == 1 or (p.lo, p.hi) == (start, start + width)


def _message(
    pieces: list[Piece], size: int, plan_geo: dict[str, KeyGeometry], src: Layout, dst: Layout
) -> Message:
    p = pieces[0]
    direct_send = direct_recv = False
    if len(pieces) == 1:
        g = plan_geo[p.key]
        direct_send = _contiguous(p, g, p.src_lo, g.length // src.tp if g.split else g.length)
        direct_recv = _contiguous(p, g, p.dst_lo, g.length // dst.tp if g.split else g.length)
    return Message(p.src, p.dst, tuple(pieces), size, -1, direct_send, direct_recv)


def _pack(
    remote: list[Piece], spec: ModelSpec, src: Layout, dst: Layout, limit: int, element_size: int
) -> list[list[Message]]:
    """Messages of at most ``limit`` bytes, per (sender, receiver) pair, in piece order."""
    by_pair: dict[tuple[int, int], list[Piece]] = {}
    for p in remote:
        by_pair.setdefault((p.src, p.dst), []).append(p)
    return [_pack_pair(pieces, spec, src, dst, limit, element_size) for pieces in by_pair.values()]


def _pack_pair(
    pieces: list[Piece], spec: ModelSpec, src: Layout, dst: Layout, limit: int, element_size: int
) -> list[Message]:
    """Messages of one (sender, receiver) pair.

    Pieces of at least ``min(limit // 8, 256 KiB)`` travel alone, so a contiguous one is sent
    from and received into the parameters themselves; smaller ones share messages (packing
    them costs less than a message each).
    """
    geo = key_geometry(spec)
    alone = min(limit // 8, 256 * 1024)
    msgs: list[Message] = []
    cur: list[Piece] = []
    size = 0

    def close() -> None:
        nonlocal cur, size
        if cur:
            msgs.append(_message(cur, size, geo, src, dst))
        cur, size = [], 0

    queue = list(reversed(pieces))
    while queue:
        p = queue.pop()
        if p.nbytes >= alone:
            close()
            rows = limit // (geo[p.key].row_elems * element_size)
            while p.hi - p.lo > rows:
                head, p = _split(p, rows, geo[p.key], element_size)
                msgs.append(_message([head], head.nbytes, geo, src, dst))
            msgs.append(_message([p], p.nbytes, geo, src, dst))
            continue
        if size + p.nbytes <= limit:
            cur.append(p)
            size += p.nbytes
            continue
        rows = (limit - size) // (geo[p.key].row_elems * element_size)
        if rows > 0:
            head, tail = _split(p, rows, geo[p.key], element_size)
            cur.append(head)
            size += head.nbytes
            queue.append(tail)
        else:
            queue.append(p)
        close()
    close()
    return msgs


def _schedule(per_pair: list[list[Message]], limit: int) -> tuple[list[Message], int]:
    """Assign rounds first-fit so no rank packs, or unpacks, more than ``limit`` bytes in a round.

    Direct messages need no staging and all go in round 0. The pairs' messages are taken in
    turn so that every pair starts early.
    """
    packed_out: list[dict[int, int]] = []
    packed_in: list[dict[int, int]] = []
    out: list[Message] = []
    depth = max((len(m) for m in per_pair), default=0)
    for i in range(depth):
        for msgs in per_pair:
            if i >= len(msgs):
                continue
            m = msgs[i]
            cs = 0 if m.direct_send else m.nbytes
            cr = 0 if m.direct_recv else m.nbytes
            r = 0
            while r < len(packed_out) and (
                packed_out[r].get(m.src, 0) + cs > limit or packed_in[r].get(m.dst, 0) + cr > limit
            ):
                r += 1
            if r == len(packed_out):
                packed_out.append({})
                packed_in.append({})
            packed_out[r][m.src] = packed_out[r].get(m.src, 0) + cs
            packed_in[r][m.dst] = packed_in[r].get(m.dst, 0) + cr
            out.append(replace(m, round=r))
    out.sort(key=lambda m: m.round)  # stable: a pair's messages keep their order
    return out, len(packed_out)


@lru_cache(maxsize=512)
def plan_realloc(
    spec: ModelSpec,
    src: Layout,
    dst: Layout,
    gpus_per_node: int = 8,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    element_size: int = 4,
) -> ReallocPlan:
    """Plan moving ``spec`` from resolved layout ``src`` to resolved layout ``dst`` (cached).

    ``element_size`` is the bytes per parameter (4 for fp32, 2 for bf16). Pure Python: the planner
    prices moves with it, and every rank derives the same plan without communicating. For pricing
    large models inside a search loop, :func:`lightning_real.realloc.cost.realloc_bytes` gives the
    same byte totals analytically.
    """
    check_layout(spec, src, "source")
    check_layout(spec, dst, "destination")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 1:
        raise ValueError(f"gpus_per_node={gpus_per_node!r}; allowed: a positive integer")
    if element_size not in (1, 2, 4, 8):
        raise ValueError(f"element_size={element_size!r}; allowed: 1, 2, 4, 8 (bytes per parameter)")
    widest = max(g.row_elems for g in key_geometry(spec).values()) * element_size
    if not isinstance(bucket_bytes, int) or bucket_bytes < 2 * widest:
        raise ValueError(
            f"bucket_bytes={bucket_bytes!r}; allowed: an integer of at least {2 * widest} "
            f"(two rows of the widest parameter view of this model)"
        )
    local, remote, shard_bytes = _pieces(spec, src, dst, element_size, gpus_per_node)
    limit = bucket_bytes // 2
    messages, rounds = _schedule(_pack(remote, spec, src, dst, limit, element_size), limit)
    lower = sum(shard_bytes.values()) - sum(p.nbytes for p in local)
    return ReallocPlan(
        spec=spec,
        src=src,
        dst=dst,
        element_size=element_size,
        bucket_bytes=bucket_bytes,
        gpus_per_node=gpus_per_node,
        local=tuple(local),
        messages=tuple(messages),
        num_rounds=rounds,
        lower_bound_bytes=lower,
        dst_shard_bytes=shard_bytes,
    )
