"""The iteration simulator, reallocation pricing and the timeline picture."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_real.layout import Layout
from lightning_real.models.spec import tiny_spec
from lightning_real.planner.hardware import H100, Cluster
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.simulate import simulate
from lightning_real.planner.timeline import device_rows, plot_timeline
from lightning_real.planner.transfer import realloc_cost, realloc_time
from lightning_real.planner.workload import ppo_workload
from lightning_real.plans import Plan
from lightning_real.realloc import plan_realloc

NODE = Cluster(1, 8, H100)
W = ppo_workload(llama2_spec("7b"), batch_size=128, prompt_len=128, gen_len=128)


def _plan(layouts: dict[str, str], m: int = 8) -> Plan:
    return Plan({k: Layout.parse(v) for k, v in layouts.items()}, {k: m for k in layouts})


HALVES = {
    "actor_gen": "d2t4p1@0-7",
    "rew_inf": "d1t4p1@0-3",
    "ref_inf": "d1t4p1@0-3",
    "critic_inf": "d1t4p1@4-7",
    "actor_train": "d1t4p1@0-3",
    "critic_train": "d1t4p1@4-7",
}


def test_disjoint_calls_overlap_and_shared_ones_serialize() -> None:
    res = simulate(W, _plan(HALVES), NODE)
    assert res.feasible
    ev = {e.name: e for e in res.events}
    # trainings on disjoint halves run side by side
    a, c = ev["actor_train"], ev["critic_train"]
    assert a.start < c.end and c.start < a.end
    # reward and reference inference share devices 0-3: one after the other
    r, f = ev["rew_inf"], ev["ref_inf"]
    assert r.end <= f.start + 1e-12 or f.end <= r.start + 1e-12
    # dependencies: inferences after generation, trainings after all inferences
    for n in ("rew_inf", "ref_inf", "critic_inf"):
        assert ev[n].start >= ev["actor_gen"].end
        assert a.start >= ev[n].end and c.start >= ev[n].end
    # every call lasts exactly its predicted cost
    for n in W.names:
        assert ev[n].end - ev[n].start == pytest.approx(res.costs[n].time)
    assert res.time == pytest.approx(max(a.end, c.end))


def test_reallocation_before_calls_away_from_home() -> None:
    res = simulate(W, _plan(HALVES), NODE)
    moves = {e.call: e for e in res.events if e.kind == "realloc"}
    # the actor lives at its train layout (tp4 on 0-3): generation on d2t4@0-7 needs a move;
    # the critic's inference shares its train layout, so it needs none
    assert set(moves) == {"actor_gen"}
    mv = moves["actor_gen"]
    assert (
        set(mv.ranks) == set(range(8))
        and mv.end <= {e.name: e for e in res.events}["actor_gen"].start + 1e-12
    )
    src, dst = Layout.parse("d1t4p1@0-3"), Layout.parse("d2t4p1@0-7")
    assert mv.end - mv.start == pytest.approx(
        realloc_time(W.spec("actor_gen"), src, dst, NODE, W.features.param_bytes)
    )


def test_same_layout_everywhere_moves_nothing() -> None:
    res = simulate(W, _plan({n: "d2t2p2@0-7" for n in W.names}), NODE)
    assert res.feasible and not [e for e in res.events if e.kind == "realloc"]
    # everything on the same devices: the iteration is the sum of the calls
    assert res.time == pytest.approx(sum(c.time for c in res.costs.values()))


def test_realloc_pricing_uses_the_reallocation_plans_bytes() -> None:
    # The planner prices moves with lightning_real.realloc's analytic totals; they must equal the
    # byte counts of the plan the runtime would execute (exact, integer bytes).
    spec = tiny_spec("llama")
    pairs = [
        ("d1t1p1@0", "d1t1p1@1"),
        ("d1t2p1@0-1", "d2t1p1@0-1"),
        ("d2t1p2@0-3", "d1t2p2@0-3"),
        ("d2t2p1@0-3", "d1t1p2@2-3"),
    ]
    for a, b in pairs:
        src, dst = Layout.parse(a), Layout.parse(b)
        priced = realloc_cost(spec, src, dst, 8, 4)
        planned = plan_realloc(spec, src, dst, gpus_per_node=8, element_size=4)
        assert priced.bytes_sent == planned.bytes_sent, (a, b)
    # a full move to another device sends the whole model (fp32: 4 bytes per parameter)
    assert (
        realloc_cost(spec, Layout.parse("d1t1p1@0"), Layout.parse("d1t1p1@1"), 8, 4).bytes_sent
        == 4 * spec.num_params()
    )


def test_realloc_time_is_bounded_by_the_slowest_receiver() -> None:
    spec = llama2_spec("7b")
    src, dst = Layout.parse("d1t1p1@0"), Layout.parse("d1t1p1@1")
    # all 13.5 GB go to one rank over NVLink (same node)
    t = realloc_time(spec, src, dst, NODE, 2)  # bf16 working copy
    assert t == pytest.approx(2 * spec.num_params() / H100.intra_bw + H100.intra_latency)
    # across nodes the same move takes the InfiniBand bandwidth
    two = Cluster(2, 8, H100)
    t2 = realloc_time(spec, src, Layout.parse("d1t1p1@8"), two, 2)
    assert t2 == pytest.approx(2 * spec.num_params() / H100.inter_bw + H100.inter_latency)
    assert realloc_time(spec, src, src, NODE, 2) == 0.0


def test_timeline_rows_and_picture(tmp_path: Path) -> None:
    plan = _plan(HALVES)
    res = simulate(W, plan, NODE)
    rows = device_rows(res.events, 8)
    assert rows == [(0, 1, 2, 3), (4, 5, 6, 7)]
    png, svg = tmp_path / "t.png", tmp_path / "t.svg"
    fig = plot_timeline(res, plan, 8, png)
    fig.savefig(svg)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert b"<svg" in svg.read_bytes()[:500]


def test_infeasible_plan_has_no_timeline() -> None:
    one = {n: "d1t1p1@0" for n in W.names}
    res = simulate(W, _plan(one), NODE)
    with pytest.raises(ValueError, match="does not fit"):
        plot_timeline(res, _plan(one), 8)
