"""Forward under every layout equals transformers' own forward (fp32) on real gloo groups."""

from __future__ import annotations

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits, forward_logprobs, forward_values, position_ids
from lightning_real.models.hf import hf_model
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import tiny_spec

# fp32 on CPU: megatron and transformers sum in different orders; 1e-4 absolute on logits of
# magnitude ~1 leaves room for that and nothing else (a wrong head split is off by >1e-1).
ATOL = 1e-4
LAYOUTS_4 = ["d1t2p2", "d2t1p2", "d2t2p1", "d4t1p1", "d1t1p4"]
LAYOUTS_2 = ["d1t2p1", "d1t1p2", "d2t1p1"]
FAMILIES = ["llama", "qwen2", "gpt2"]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    pad = torch.ones(4, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding of different lengths
    pad[3, :5] = 0
    ids = ids * pad
    return ids, pad


def _world(rank: int, world: int, layouts: list[str]) -> dict:
    reg = GroupRegistry()
    ids, pad = _batch()
    out = {}
    for fam in FAMILIES:
        for head in ("lm", "value"):
            spec = tiny_spec(fam, head)
            can = random_canonical(spec, seed=7)
            for lay_s in layouts:
                lay = Layout.parse(lay_s).resolve(world)
                shard = ModelShard.from_canonical(spec, reg.for_layout(lay), can)
                c = lay.coords(rank)
                lo, hi = c[0] * 4 // lay.dp, (c[0] + 1) * 4 // lay.dp
                n_mbs = 2 if hi - lo >= 2 else 1
                if head == "lm":
                    logits = forward_logits(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs)
                    lp = forward_logprobs(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs)
                    out[(fam, head, lay_s)] = (lo, hi, logits, lp)
                else:
                    out[(fam, head, lay_s)] = (
                        lo,
                        hi,
                        forward_values(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs),
                    )
    return out


def _reference(fam: str, head: str):
    spec = tiny_spec(fam, head)
    model = hf_model(spec, random_canonical(spec, seed=7))
    ids, pad = _batch()
    with torch.no_grad():
        if head == "lm":
            logits = model(input_ids=ids, attention_mask=pad, position_ids=position_ids(pad)).logits
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            return logits, lp
        base = model.transformer if fam == "gpt2" else model.model
        h = base(input_ids=ids, attention_mask=pad, position_ids=position_ids(pad)).last_hidden_state
        return (h @ model.score.weight.t()).squeeze(-1), None


def _check(results: list[dict], layouts: list[str]) -> None:
    _, pad = _batch()
    real = pad.bool()
    for fam in FAMILIES:
        ref_logits, ref_lp = _reference(fam, "lm")
        ref_values, _ = _reference(fam, "value")
        for res in results:
            for lay in layouts:
                lo, hi, logits, lp = res[(fam, "lm", lay)]
                m = real[lo:hi]
                assert (logits[m] - ref_logits[lo:hi][m]).abs().max() < ATOL, (fam, lay)
                mm = m[:, 1:] & m[:, :-1]
                assert (lp[mm] - ref_lp[lo:hi][mm]).abs().max() < ATOL, (fam, lay)
                lo, hi, values = res[(fam, "value", lay)]
                assert (values[m] - ref_values[lo:hi][m]).abs().max() < ATOL, (fam, lay)


def test_single_process_matches_transformers():
    _check(spawn(_world, 1, ["d1t1p1"]), ["d1t1p1"])


def test_two_processes_match_transformers():
    _check(spawn(_world, 2, LAYOUTS_2), LAYOUTS_2)


def test_four_processes_match_transformers():
    _check(spawn(_world, 4, LAYOUTS_4), LAYOUTS_4)


def test_packed_rows_equal_unpacked():
    reg_results = spawn(_packed_world, 2)
    packed, separate = reg_results[0]
    assert torch.allclose(packed, separate, atol=ATOL)


def _packed_world(rank: int, world: int):
    spec = tiny_spec("llama")
    lay = Layout.parse("d1t2p1").resolve(world)
    shard = ModelShard.from_canonical(spec, GroupRegistry().for_layout(lay), random_canonical(spec, 3))
    a = torch.randint(3, 250, (1, 5))
    b = torch.randint(3, 250, (1, 7))
    ids = torch.cat([a, b], 1)
    seg = torch.tensor([[1] * 5 + [2] * 7])
    pad = torch.ones_like(ids)
    lp = forward_logprobs(shard, ids, pad, segment_ids=seg)
    lpa = forward_logprobs(shard, a, torch.ones_like(a))
    lpb = forward_logprobs(shard, b, torch.ones_like(b))
    # the packed row scores token t+1 at t; skip the position that crosses the segment boundary
    packed = torch.cat([lp[0, :4], lp[0, 5:]])
    return packed, torch.cat([lpa[0], lpb[0]])


@pytest.mark.parametrize("bad", ["d3t1p1", "d1t3p1"])
def test_layout_that_does_not_fit_is_rejected(bad):
    from lightning_real.layout import LayoutError

    with pytest.raises(LayoutError):
        Layout.parse(bad).validate(4, tiny_spec("llama"))
