"""The executor walks a graph on 4 gloo ranks: rows reach consumers, disjoint calls overlap in time."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.runtime.executor import Executor, reduce_metrics
from lightning_real.runtime.trace import gather_events

B = 8


@dataclass(frozen=True)
class Call:
    name: str
    role: str
    input_keys: tuple[str, ...]
    output_keys: tuple[str, ...]
    batch_size: int = B


CALLS = [
    Call("gen", "actor", ("prompts",), ("seq",)),
    Call("left", "ref", ("seq",), ("a",)),
    Call("right", "critic", ("seq",), ("b",)),
    Call("train", "actor", ("seq", "a", "b"), ()),
]
PLAN = {"gen": "d4t1p1", "left": "d2t1p1@0-1", "right": "d1t2p1@2-3", "train": "d2t2p1"}


def _gen(shard, x):
    return {"seq": x["prompts"] * 10}, {}


def _slow(key: str, scale: float):
    def fn(shard, x):
        time.sleep(1.0)  # long enough that two concurrent calls clearly overlap
        return {key: x["seq"].float() * scale}, {}

    return fn


def _train(shard, x):
    ok = torch.equal(x["a"], x["seq"].float() * 2) and torch.equal(x["b"], x["seq"].float() * 3)
    return {}, {"rows_ok": float(ok), "seq_sum": float(x["seq"].sum())}


def _world(rank: int, world: int):
    plan = {k: Layout.parse(v).resolve(world) for k, v in PLAN.items()}
    fns = {"gen": _gen, "left": _slow("a", 2.0), "right": _slow("b", 3.0), "train": _train}
    ex = Executor(CALLS, plan, fns, move=lambda role, lay: (None, 0), rank=rank)
    prompts = torch.arange(B * 4).reshape(B, 4)
    res = ex.run({"prompts": prompts})
    metrics = reduce_metrics(res.metrics)
    events = gather_events(ex.tracer.pop())
    return metrics, [(e.name, e.kind, e.rank, e.start, e.end) for e in events if e.kind == "call"]


def test_executor_moves_rows_and_overlaps_disjoint_calls():
    results = spawn(_world, 4)
    metrics, events = results[0]
    assert metrics["rows_ok"] == 1.0
    # train runs as 2 replicas of 4 rows; the mean over reporting ranks of each replica's sum:
    total = float((torch.arange(B * 4).reshape(B, 4) * 10).sum())
    assert abs(metrics["seq_sum"] - total / 2) < 1e-6
    left = [(s, e) for n, _, r, s, e in events if n == "left"]
    right = [(s, e) for n, _, r, s, e in events if n == "right"]
    assert len(left) == 2 and len(right) == 2
    # Disjoint ranks: the two calls' intervals intersect in time.
    assert max(s for s, _ in left + right) < min(e for _, e in left + right)
