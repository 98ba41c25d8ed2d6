"""The reallocation plan without processes: coverage, minimality, bucketing, rounds, pricing."""

from __future__ import annotations

import time
from collections import defaultdict

import pytest
import torch

from lightning_real.layout import Layout, LayoutError
from lightning_real.models.sharding import param_specs
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.realloc import ReallocConfig, plan_realloc, realloc_bytes
from lightning_real.realloc.geometry import geometry_of
from lightning_real.realloc.plan import ReallocPlan

LLAMA = tiny_spec("llama", num_heads=8, num_kv_heads=4)
GPT2 = tiny_spec("gpt2")
QWEN_VALUE = tiny_spec("qwen2", "value")
# 70B-class llama (GQA, 80 layers) for pricing speed.
BIG = ModelSpec("llama", 32000, 8192, 80, 64, 8, 28672)

PAIRS = [
    (LLAMA, "d1t2p2", "d4t1p1", 4),
    (LLAMA, "d2t2p1", "d1t1p4", 4),
    (LLAMA, "d1t1p1@0", "d1t2p1@2-3", 4),
    (LLAMA, "d2t1p1@0-1", "d1t4p1", 4),
    (LLAMA, "d1t4p1", "d1t1p3@1-3", 4),
    (LLAMA, "d4t1p1", "d1t2p2", 4),
    (LLAMA, "d2t2p2", "d8t1p1", 8),
    (LLAMA, "d1t4p2", "d2t2p2", 8),
    (LLAMA, "d2t1p1@0,5", "d1t2p1@4,7", 8),
    (GPT2, "d1t1p1@0", "d1t1p2@1-2", 4),
    (GPT2, "d1t2p2", "d2t2p1", 4),
    (GPT2, "d1t1p3@0-2", "d1t4p1", 4),
    (QWEN_VALUE, "d2t1p2", "d1t2p1@1-2", 4),
]
IDS = [f"{s.family}:{a}->{b}" for s, a, b, _ in PAIRS]


def _plan(spec: ModelSpec, a: str, b: str, world: int, **kw) -> ReallocPlan:
    kw.setdefault("gpus_per_node", 2)
    kw.setdefault("bucket_bytes", 16 * 1024)
    return plan_realloc(spec, Layout.parse(a).resolve(world), Layout.parse(b).resolve(world), **kw)


def _slices(spec: ModelSpec, layout: Layout, world: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(rank, key) -> rows held, straight from the sharding spec (independent of the planner)."""
    out = {}
    for r in range(world):
        c = layout.coords(r)
        for ps in param_specs(spec, layout, r):
            out[(r, ps.key)] = ps.chunk(c[1], layout.tp)
    return out


@pytest.mark.parametrize(("spec", "a", "b", "world"), PAIRS, ids=IDS)
def test_every_destination_byte_arrives_exactly_once(spec: ModelSpec, a: str, b: str, world: int) -> None:
    plan = _plan(spec, a, b, world)
    A, B = plan.src, plan.dst
    src, dst = _slices(spec, A, world), _slices(spec, B, world)
    geo = {ps.key: geometry_of(ps) for r in range(world) for ps in param_specs(spec, B, r)}
    covered: dict[tuple[int, str], list[int]] = {k: [0] * (hi - lo) for k, (lo, hi) in dst.items()}
    pieces = list(plan.local) + [p for m in plan.messages for p in m.pieces]
    for p in pieces:
        assert (p.src == p.dst) == (p in plan.local)
        s_lo, s_hi = src[(p.src, p.key)]  # the sender holds the rows
        assert s_lo <= p.lo < p.hi <= s_hi and p.src_lo == s_lo
        d_lo, d_hi = dst[(p.dst, p.key)]
        assert d_lo <= p.lo < p.hi <= d_hi and p.dst_lo == d_lo
        assert p.nbytes == (p.hi - p.lo) * geo[p.key].row_elems * 4
        for i in range(p.lo - d_lo, p.hi - d_lo):
            covered[(p.dst, p.key)][i] += 1
    assert all(c == 1 for rows in covered.values() for c in rows)

    # Minimal: a byte the receiver already holds is never sent; sent bytes == the lower bound.
    lower = 0
    for (r, key), (lo, hi) in dst.items():
        own = src.get((r, key))
        held = max(0, min(hi, own[1]) - max(lo, own[0])) if own else 0
        lower += (hi - lo - held) * geo[key].row_elems * 4
        assert all(
            p.src == r
            for p in pieces
            if p.dst == r and p.key == key and own and p.lo < own[1] and p.hi > own[0]
        )
    assert plan.bytes_sent == plan.lower_bound_bytes == lower
    assert plan.bytes_sent + plan.bytes_local == sum(plan.dst_shard_bytes.values())


@pytest.mark.parametrize(("spec", "a", "b", "world"), PAIRS, ids=IDS)
def test_messages_fit_half_a_bucket_and_rounds_fit_the_bucket(
    spec: ModelSpec, a: str, b: str, world: int
) -> None:
    plan = _plan(spec, a, b, world)
    half = plan.bucket_bytes // 2
    packed_out: dict[tuple[int, int], int] = defaultdict(int)
    packed_in: dict[tuple[int, int], int] = defaultdict(int)
    for m in plan.messages:
        assert 0 < m.nbytes <= half
        assert m.nbytes == sum(p.nbytes for p in m.pieces)
        assert all(p.src == m.src and p.dst == m.dst for p in m.pieces)
        assert (m.direct_send or m.direct_recv) <= (len(m.pieces) == 1)
        packed_out[(m.round, m.src)] += 0 if m.direct_send else m.nbytes
        packed_in[(m.round, m.dst)] += 0 if m.direct_recv else m.nbytes
    # In every round a rank packs at most half a bucket and unpacks at most half a bucket.
    assert max(packed_out.values(), default=0) <= half and max(packed_in.values(), default=0) <= half
    assert plan.num_rounds == len({m.round for m in plan.messages})
    for r in range(world):
        rp = plan.for_rank(r)
        assert rp.staging_bytes <= plan.bucket_bytes
        assert [s.round for s in rp.steps] == sorted({s.round for s in rp.steps})
        assert rp.bytes_sent == plan.sent_by_rank.get(r, 0)
        assert rp.bytes_received == plan.received_by_rank.get(r, 0)
    # A message marked direct is one piece that is a contiguous block of the parameter itself.
    geo = {p.key: geometry_of(p) for r in range(world) for p in param_specs(spec, plan.src, r)}
    direct = 0
    for m in plan.messages:
        for flag, tp, origin in (
            (m.direct_send, plan.src.tp, "src_lo"),
            (m.direct_recv, plan.dst.tp, "dst_lo"),
        ):
            if flag:
                (p,) = m.pieces
                g = geo[p.key]
                local = torch.empty(g.local_view_shape(tp))
                assert local.narrow(g.dim, p.lo - getattr(p, origin), p.hi - p.lo).is_contiguous()
                direct += 1
    if plan.messages:
        assert direct > 0
    for r in range(world):
        rp = plan.for_rank(r)
        assert rp.staging_bytes <= plan.bucket_bytes
        assert [s.round for s in rp.steps] == sorted({s.round for s in rp.steps})


@pytest.mark.parametrize(("spec", "a", "b", "world"), PAIRS, ids=IDS)
@pytest.mark.parametrize("gpus_per_node", [1, 2, 8])
def test_analytic_bytes_agree_with_the_plan(
    spec: ModelSpec, a: str, b: str, world: int, gpus_per_node: int
) -> None:
    plan = _plan(spec, a, b, world, gpus_per_node=gpus_per_node, element_size=2)
    cost = realloc_bytes(spec, plan.src, plan.dst, gpus_per_node=gpus_per_node, element_size=2)
    assert cost.bytes_sent == plan.bytes_sent == cost.lower_bound_bytes == plan.lower_bound_bytes
    assert cost.bytes_local == plan.bytes_local
    assert cost.bytes_cross_node == plan.bytes_cross_node
    assert cost.max_recv_bytes == plan.max_recv_bytes
    assert dict(cost.recv_by_rank) == plan.received_by_rank


def test_analytic_bytes_agree_on_a_large_model() -> None:
    src, dst = Layout.parse("d2t4p2").resolve(16), Layout.parse("d4t2p2").resolve(16)
    plan = plan_realloc(BIG, src, dst, gpus_per_node=8, bucket_bytes=1 << 30, element_size=2)
    cost = realloc_bytes(BIG, src, dst, gpus_per_node=8, element_size=2)
    assert (cost.bytes_sent, cost.bytes_local, cost.bytes_cross_node, cost.max_recv_bytes) == (
        plan.bytes_sent,
        plan.bytes_local,
        plan.bytes_cross_node,
        plan.max_recv_bytes,
    )
    assert plan.bytes_sent > 10e9  # a real move: tens of GB of a 70B model


def test_senders_spread_over_source_replicas() -> None:
    # Two source replicas feed two receivers: each replica sends about half.
    plan = _plan(LLAMA, "d2t1p1@0-1", "d1t2p1@2-3", 4, gpus_per_node=4)
    sent = plan.sent_by_rank
    assert set(sent) == {0, 1}
    assert max(sent.values()) / min(sent.values()) < 1.1
    # Replicated tensors too: a tp=2 source serves a 4-rank dp destination from both tp ranks.
    plan = _plan(LLAMA, "d1t2p1@0-1", "d2t1p1@2-3", 4, gpus_per_node=4)
    assert min(plan.sent_by_rank.values()) > 0


def test_a_sender_on_the_receivers_node_is_preferred() -> None:
    # Replicas on rank 0 (node 0) and rank 5 (node 1); receivers 4 and 7 are on node 1.
    plan = _plan(LLAMA, "d2t1p1@0,5", "d1t2p1@4,7", 8, gpus_per_node=4)
    assert plan.bytes_cross_node == 0
    assert set(plan.sent_by_rank) == {5}
    # With one rank per node every byte crosses.
    plan = _plan(LLAMA, "d2t1p1@0,5", "d1t2p1@4,7", 8, gpus_per_node=1)
    assert plan.bytes_cross_node == plan.bytes_sent > 0


def test_plans_are_cached_and_ranks_outside_do_nothing() -> None:
    p1 = _plan(LLAMA, "d1t1p1@0", "d1t2p1@2-3", 4)
    assert _plan(LLAMA, "d1t1p1@0", "d1t2p1@2-3", 4) is p1
    idle = p1.for_rank(1)
    assert idle.local == () and idle.steps == () and idle.staging_bytes == 0
    # A rank that only sends needs no receive staging.
    assert p1.for_rank(0).recv_staging_bytes == 0 and p1.for_rank(0).bytes_sent > 0
    assert p1.ranks == (0, 2, 3)
    assert p1.bytes_local == 0 and p1.bytes_sent == sum(p1.dst_shard_bytes.values())


def test_pricing_a_70b_move_on_128_gpus_takes_milliseconds() -> None:
    pairs = [("d8t8p2", "d16t8p1"), ("d2t8p8", "d32t4p1"), ("d4t8p4", "d8t4p4"), ("d1t8p16", "d16t8p1")]
    lays = [(Layout.parse(a).resolve(128), Layout.parse(b).resolve(128)) for a, b in pairs]
    realloc_bytes.cache_clear()
    t0 = time.perf_counter()
    costs = [realloc_bytes(BIG, a, b, 8, 2) for a, b in lays]
    per_call = (time.perf_counter() - t0) / len(lays)
    # A few ms on an idle core (see docs/realloc.md); the bound leaves room for a loaded machine
    # and is still far below the ~0.7 s of building the full plan.
    assert per_call < 0.1, f"{per_call * 1e3:.1f} ms per uncached call"
    t0 = time.perf_counter()
    assert [realloc_bytes(BIG, a, b, 8, 2) for a, b in lays] == costs
    assert (time.perf_counter() - t0) / len(lays) < 1e-3  # cached
    # d8t8p2 -> d16t8p1: each of 128 ranks needs a tp=8 slice of the whole model (bf16) and
    # holds about half of it (its own stage); the other stage lives on other nodes.
    c = costs[0]
    expect = 128 * BIG.num_params() * 2 / 8 / 2
    assert abs(c.bytes_sent / expect - 1) < 0.05
    assert c.bytes_cross_node == c.bytes_sent


def test_bad_input_is_named() -> None:
    A, B = Layout.parse("d1t2p1").resolve(2), Layout.parse("d2t1p1").resolve(2)
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_realloc(LLAMA, A, B, bucket_bytes=8)
    with pytest.raises(ValueError, match="gpus_per_node"):
        plan_realloc(LLAMA, A, B, gpus_per_node=0)
    with pytest.raises(ValueError, match="element_size"):
        plan_realloc(LLAMA, A, B, element_size=3)
    with pytest.raises(LayoutError, match="ranks are unknown"):
        plan_realloc(LLAMA, Layout.parse("d1t2p1"), B)
    with pytest.raises(LayoutError, match="not divisible by tp=8"):
        realloc_bytes(LLAMA, A, Layout.parse("d1t8p1").resolve(8))
    with pytest.raises(ValueError, match=r"ReallocConfig\.bucket_bytes"):
        ReallocConfig(bucket_bytes=-1)
    with pytest.raises(ValueError, match=r"ReallocConfig\.dtype"):
        ReallocConfig(dtype="fp32")  # type: ignore[arg-type]
