"""Layout strings, validation errors, and per-layout process groups on 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout, LayoutError
from lightning_real.models.spec import check_layout, tiny_spec


@pytest.mark.parametrize("text", ["d2t2p1@0-3", "d4t1p2", "d1t1p1@5", "d4t1p1@0-1,4-5", "d1t2p2@0,2,4,6"])
def test_parse_format_roundtrip(text):
    assert str(Layout.parse(text)) == text
    assert Layout.parse(str(Layout.parse(text))) == Layout.parse(text)


def test_any_degree_order_and_defaults():
    assert Layout.parse("d4p2t1") == Layout(4, 1, 2)
    assert Layout.parse("t2") == Layout(1, 2, 1)


@pytest.mark.parametrize(
    ("text", "world", "message"),
    [
        ("d2t2p1@0-2", 8, "dp\\*tp\\*pp = 2\\*2\\*1 = 4 but 3 ranks"),
        ("d2t2p1", 8, "must equal the world size 8"),
        ("d2t1p1@6-7", 4, "out of range for world size 4"),
        ("x2", 4, "expected degrees like 'd2t2p1'"),
        ("d2d2", 4, "given twice"),
        ("d0t1p1", 4, "positive integer"),
        ("d1t1p1@3-1", 4, "runs backwards"),
    ],
)
def test_bad_layouts_name_the_problem(text, world, message):
    with pytest.raises(LayoutError, match=message):
        Layout.parse(text).resolve(world)


def test_model_constraints():
    spec = tiny_spec("llama")  # 4 heads, 2 kv heads, 4 layers
    with pytest.raises(LayoutError, match="key/value heads are not divisible by tp=4"):
        check_layout(spec, Layout.parse("d1t4p1").resolve(4))
    with pytest.raises(LayoutError, match="fewer than pp=8"):
        check_layout(spec, Layout.parse("d1t1p8").resolve(8))
    check_layout(spec, Layout.parse("d1t2p2").resolve(4))


def test_coordinates_follow_megatron_order():
    lay = Layout.parse("d2t2p2").resolve(8)
    assert lay.tp_groups()[0] == (0, 1)
    assert lay.dp_groups()[0] == (0, 2)
    assert lay.pp_groups()[0] == (0, 4)
    assert lay.coords(6) == (1, 0, 1)
    assert lay.rank_at(1, 0, 1) == 6


def _groups_world(rank: int, world: int) -> dict:
    reg = GroupRegistry()
    layouts = [Layout.parse(s) for s in ("d1t2p2", "d2t1p1@2-3", "d1t2p1@0-1")]
    out = {}
    for lay in layouts:
        g = reg.for_layout(lay)
        if g.member:
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=g.tp)
            out[str(lay)] = (g.coords, float(t))
    return out


def test_groups_are_created_everywhere_and_work():
    res = spawn(_groups_world, 4)
    assert res[0]["d1t2p2"] == ((0, 0, 0), 1.0)  # tp group {0, 1}
    assert res[3]["d1t2p2"] == ((0, 1, 1), 5.0)  # tp group {2, 3}
    assert res[3]["d2t1p1@2-3"] == ((1, 0, 0), 3.0)
    assert "d2t1p1@2-3" not in res[0]
    assert res[1]["d1t2p1@0-1"] == ((0, 1, 0), 1.0)
