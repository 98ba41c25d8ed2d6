"""Batch rows move between the data-parallel replicas of two layouts on real gloo groups."""

from __future__ import annotations

import torch

from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.runtime.trace import Tracer, gather_events, summarize, to_chrome_trace
from lightning_real.runtime.transfer import plan_transfer, post_sends, receive, row_range

B = 8
PAIRS = [
    ("d2t1p1@0-1", "d1t2p2"),  # 2 replicas -> 1 replica spread over 4 ranks
    ("d4t1p1", "d2t2p1"),
    ("d2t1p1@0-1", "d2t1p1@2-3"),  # disjoint ranks
    ("d1t2p2", "d4t1p1"),
]


def _global(key: str) -> torch.Tensor:
    if key == "tokens":
        return torch.arange(B * 6, dtype=torch.int64).reshape(B, 6)
    return torch.linspace(0, 1, B * 3).reshape(B, 3)


def _world(rank: int, world: int, tmp: str) -> list[dict]:
    tracer = Tracer(rank)
    out = []
    for s, d in PAIRS:
        src, dst = Layout.parse(s).resolve(world), Layout.parse(d).resolve(world)
        c = src.coords(rank)
        held = None
        if c is not None:
            lo, hi = row_range(B, src.dp, c[0])
            held = {k: _global(k)[lo:hi] for k in ("tokens", "values")}
        with tracer.span(f"data:{s}->{d}", kind="data") as info:
            handles, sent = post_sends(held, src, dst, B, rank, tag_base=1000)
            got = receive(["tokens", "values"], held, src, dst, B, rank, tag_base=1000)
            for w, _ in handles:
                w.wait()
            info["nbytes"] = sent
        out.append((s, d, got, sent))
    events = gather_events(tracer.pop())
    if rank == 0:
        to_chrome_trace(events, f"{tmp}/trace.json")
    return [{"pair": (s, d), "got": g, "sent": n} for s, d, g, n in out] + [summarize(events)]


def test_transfer_delivers_each_replicas_rows(tmp_path):
    results = spawn(_world, 4, str(tmp_path))
    for rank, res in enumerate(results):
        for item in res[:-1]:
            s, d = item["pair"]
            dst = Layout.parse(d).resolve(4)
            c = dst.coords(rank)
            if c is None:
                assert item["got"] is None
                continue
            lo, hi = row_range(B, dst.dp, c[0])
            for k in ("tokens", "values"):
                assert torch.equal(item["got"][k], _global(k)[lo:hi]), (s, d, rank, k)
    # Bytes sent equal the rows that had to leave their rank: local pieces cost nothing.
    for s, d in PAIRS:
        src, dst = Layout.parse(s).resolve(4), Layout.parse(d).resolve(4)
        row_bytes = 6 * 8 + 3 * 4
        expect = sum((p.hi - p.lo) * row_bytes for p in plan_transfer(src, dst, B) if p.src != p.dst)
        got = sum(res[PAIRS.index((s, d))]["sent"] for res in results)
        assert got == expect, (s, d)
    summary = results[0][-1]
    assert summary["data/bytes"] > 0
    assert (tmp_path / "trace.json").stat().st_size > 100


def test_plan_prefers_local_copies():
    src = Layout.parse("d4t1p1").resolve(4)
    dst = Layout.parse("d4t1p1").resolve(4)
    assert all(p.src == p.dst for p in plan_transfer(src, dst, 8))
