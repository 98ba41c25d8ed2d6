"""Layout checks and per-layout process groups beyond ``test_layout_groups.py``: every group kind's
membership on 4 gloo ranks, group-local ranks equal to layout coordinates, group sharing between
layouts, query-head, rank-range and rank-order errors."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout, LayoutError, format_ranks
from lightning_real.models.spec import check_layout, tiny_spec

LAYOUTS = ["d2t2p1", "d1t2p2", "d2t1p2", "d1t1p2@2-3", "d1t2p1@1,3"]


def test_query_heads_must_split_over_tp():
    spec = tiny_spec("llama", hidden_size=96, num_heads=6, num_kv_heads=2)
    with pytest.raises(LayoutError, match="6 attention heads are not divisible by tp=4"):
        check_layout(spec, Layout.parse("d1t4p1").resolve(4))
    check_layout(spec, Layout.parse("d2t2p1").resolve(4))


def test_validate_checks_ranks_against_the_world():
    with pytest.raises(LayoutError, match=r"ranks \[4, 5\] are out of range for world size 4"):
        check_layout(tiny_spec("llama"), Layout.parse("d1t2p1@4-5").resolve(4))


@pytest.mark.parametrize("text", ["d1t2p1@1,0", "d2t2p1@0-1,4,3", "d1t1p2@3,2"])
def test_ranks_must_increase(text):
    """Groups number their members by increasing rank: a reordered list would not match the
    layout's coordinates (megatron would split heads and vocabulary by the group's order)."""
    with pytest.raises(
        LayoutError, match=r"the ranks after '@' must be in increasing order, got .*; allowed"
    ):
        Layout.parse(text)
    with pytest.raises(LayoutError, match="increasing order"):
        Layout(1, 2, 1, (3, 2))
    assert Layout.parse("d1t2p2@0,2,4,6").ranks == (0, 2, 4, 6)


def test_format_ranks():
    assert format_ranks((0, 1, 2, 3, 6)) == "0-3,6"
    assert format_ranks((5,)) == "5"
    assert format_ranks((0, 2, 3)) == "0,2-3"


def _members(group) -> tuple[int, ...] | None:
    return None if group is None else tuple(dist.get_process_group_ranks(group))


def _world(rank: int, world: int) -> dict:
    reg = GroupRegistry()
    out: dict = {}
    for text in LAYOUTS:
        g = reg.for_layout(Layout.parse(text))
        assert reg.for_layout(Layout.parse(text)) is g  # cached, no second collective
        kinds = ("tp", "dp", "pp", "mp", "embd", "pos_embd", "all")
        out[text] = {k: _members(getattr(g, k)) for k in kinds}
        out[text]["first_last"] = (g.is_first_stage, g.is_last_stage)
        if g.member:
            # megatron splits by the group-local rank; it must be the layout's coordinate
            out[text]["local"] = tuple(dist.get_rank(getattr(g, k)) for k in ("dp", "tp", "pp"))
        if not g.member:
            try:
                g.pg_collection()
                out[text]["pgc"] = "no error"
            except RuntimeError as e:
                out[text]["pgc"] = str(e)
    # one communicator per rank set: d2t2p1 and d1t2p2 both use tp group {0, 1} on rank 0
    a, b = reg.for_layout(Layout.parse("d2t2p1")), reg.for_layout(Layout.parse("d1t2p2"))
    out["shared_tp"] = a.tp is b.tp if rank in (0, 1) else None
    return out


def _mine(sets: list[tuple[int, ...]], rank: int) -> tuple[int, ...] | None:
    return next((tuple(sorted(s)) for s in sets if rank in s), None)


def test_every_group_kind_has_the_layouts_members():
    results = spawn(_world, 4)
    for text in LAYOUTS:
        lay = Layout.parse(text).resolve(4)
        for rank, res in enumerate(results):
            got = res[text]
            if lay.coords(rank) is None:
                assert all(v is None for k, v in got.items() if k not in ("first_last", "pgc")), (text, rank)
                assert got["first_last"] == (False, False)
                assert "is not part of layout" in got["pgc"]
                continue
            assert got["tp"] == _mine(lay.tp_groups(), rank), (text, rank)
            assert got["dp"] == _mine(lay.dp_groups(), rank), (text, rank)
            assert got["pp"] == _mine(lay.pp_groups(), rank), (text, rank)
            assert got["mp"] == _mine(lay.mp_groups(), rank), (text, rank)
            pipe = _mine(lay.pp_groups(), rank)
            stage = lay.coords(rank)[2]
            # tied embeddings: first and last stage; learned positions: first stage alone
            assert got["embd"] == tuple(sorted({pipe[0], pipe[-1]})), (text, rank)
            assert got["pos_embd"] == ((pipe[0],) if stage == 0 else None), (text, rank)
            assert got["all"] == tuple(sorted(lay.ranks)), (text, rank)
            assert got["first_last"] == (stage == 0, stage == lay.pp - 1)
            assert got["local"] == lay.coords(rank), (text, rank)
    assert results[0]["shared_tp"] is True and results[1]["shared_tp"] is True
