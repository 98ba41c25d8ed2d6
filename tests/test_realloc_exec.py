"""Reallocation on 4 gloo processes: a matrix of layout pairs, each checked end to end.

For every pair A -> B (all in one spawned world; every layout's groups are created up front on
every rank): A -> B -> A is bit-identical; after A -> B the logits equal those under A;
exporting B to HF gives the original tensors, bit for bit; after an AdamW step under A and a
move to B the logits equal the trained model's under A (twice: the second step uses A's kept
optimizer state after the copy on B was dropped); the bytes sent equal the plan's lower bound;
the source copy is freed after a move and kept when asked; offloading to host memory and back
changes nothing. The first trained move of every pair runs asynchronously beside other work.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry, LayoutGroups
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import forward_logits, forward_values
from lightning_real.models.hf import canonical_to_hf, gather_canonical
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical, stage_param_specs
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.models.train import TrainConfig, TrainEngine, split_for_dp
from lightning_real.models.vocab_parallel import vocab_parallel_logprobs
from lightning_real.realloc import Reallocator, ReallocConfig, key_tensors, realloc_bytes
from lightning_real.realloc.memory import resident_bytes

WORLD = 4
SEED = 3
# Small buckets so that messages are cut inside tensors and many rounds run.
BUCKET = 24 * 1024
OPT = OptimConfig(lr=1e-3, max_grad_norm=None)

LLAMA = dict(family="llama", num_heads=8, num_kv_heads=4)  # GQA that tp=4 can split
LLAMA_PAIRS = [
    ("d1t2p2", "d4t1p1"),  # tp down, pp down, dp up; same ranks
    ("d2t2p1", "d1t1p4"),  # dp replicas to a 4-stage pipeline
    ("d1t1p1@0", "d1t2p1@2-3"),  # disjoint ranks, tp up
    ("d1t2p1@0-1", "d1t2p1@2-3"),  # disjoint ranks, same shape
    ("d2t1p1@0-1", "d1t4p1"),  # overlapping ranks, GQA at tp=4
    ("d1t4p1", "d1t1p3@1-3"),  # uneven pipeline (4 layers on 3 stages)
    ("d4t1p1", "d1t2p2"),  # every byte is local
    ("d1t4p1", "d2t2p1"),  # tp down with replicas
]
GPT2 = dict(family="gpt2")  # tied embeddings, learned positions, biases
GPT2_PAIRS = [
    ("d1t1p1@0", "d1t1p2@1-2"),  # tied weight: the last stage gets its own copy
    ("d1t2p2", "d2t2p1"),  # tied copy on the last stage folds back into the embedding
    ("d1t1p2@0-1", "d1t2p1@2-3"),
]
QWEN_VALUE = dict(family="qwen2", head="value")  # qkv bias, scalar head
QWEN_PAIRS = [
    ("d2t1p2", "d1t2p1@1-2"),
    ("d1t2p1@2-3", "d1t1p4"),
]


def _spec(kw: dict[str, Any]) -> ModelSpec:
    kw = dict(kw)
    return tiny_spec(kw.pop("family"), kw.pop("head", "lm"), **kw)


def _eval(shard: ModelShard, tokens: torch.Tensor) -> torch.Tensor | None:
    """Full-vocabulary logits (or values) on every rank of the layout, None outside it."""
    if not shard.member:
        return None
    pad = torch.ones_like(tokens)
    if shard.spec.head == "value":
        return forward_values(shard, tokens, pad)
    return forward_logits(shard, tokens, pad)


def _loss(tp_group: Any, output: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple:
    if output.shape[-1] == 1:  # value head
        return 0.5 * ((output.squeeze(-1).float() - mb["returns"]) ** 2).sum(), {}
    return -vocab_parallel_logprobs(output, mb["labels"], tp_group).sum(), {}


def _batch(spec: ModelSpec) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (4, 8), generator=gen)
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "returns": torch.randn(4, 8, generator=gen)}


def _reporter(g: LayoutGroups) -> bool:
    return g.member and g.coords[0] == 0 and g.coords[1] == 0 and g.is_last_stage


def _locals(shard: ModelShard) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in key_tensors(shard).items()}


def _mismatches(now: dict[str, torch.Tensor], then: dict[str, torch.Tensor]) -> int:
    assert sorted(now) == sorted(then)
    return sum(int((now[k] != then[k]).sum()) for k in then)


def _world(rank: int, world: int, jobs: list[tuple[dict[str, Any], str, str]]) -> list[dict]:
    torch.manual_seed(0)
    registry = GroupRegistry()
    # Every layout's groups, created up front in the same order on every rank.
    layouts = [Layout.parse(x).resolve(world) for _, a, b in jobs for x in (a, b)]
    registry.build(layouts)
    config = ReallocConfig(bucket_bytes=BUCKET, gpus_per_node=2)
    results = []
    for i, (spec_kw, a_text, b_text) in enumerate(jobs):
        spec = _spec(spec_kw)
        batch = _batch(spec)
        tokens = batch["input_ids"]
        A, B = layouts[2 * i], layouts[2 * i + 1]
        ra = Reallocator(spec, registry, config)
        sh_a = ra.adopt(ModelShard.from_canonical(spec, registry.for_layout(A), random_canonical(spec, SEED)))
        sh_b = ra.shard(B)
        orig = _locals(sh_a)
        res: dict[str, Any] = {"pair": (a_text, b_text), "rank": rank}
        res["reporter"] = (_reporter(sh_a.groups), _reporter(sh_b.groups))
        res["logits_a"] = _eval(sh_a, tokens)

        # A -> B frees A; B -> A brings the same bytes back and frees B.
        ra.move(A, B)
        res["stats_ab"] = ra.last_stats
        res["resident"] = (resident_bytes(sh_a.module), resident_bytes(sh_b.module))
        res["holds"] = (ra.holds(A), ra.holds(B))
        res["logits_b"] = _eval(sh_b, tokens)
        res["b_locals"] = _locals(sh_b)
        exported = gather_canonical(sh_b)
        res["hf_b"] = None if exported is None else canonical_to_hf(spec, exported)
        ra.move(B, A)
        res["roundtrip_mismatch"] = _mismatches(key_tensors(sh_a), orig)
        res["b_resident_after_back"] = resident_bytes(sh_b.module)

        # Train under A, move to B keeping A (and its optimizer state), drop B, train again.
        engine = TrainEngine(
            sh_a, functools.partial(_loss, sh_a.groups.tp), TrainConfig(norm_key=None, optim=OPT)
        )
        local = split_for_dp(batch, A.dp, sh_a.groups.dp_rank) if sh_a.member else batch
        res["trained"] = []
        for step in range(2):
            engine.step(local)
            trained = _locals(sh_a)
            logits_a = _eval(sh_a, tokens)
            if step == 0:
                handle = ra.move_async(A, B, keep_source=True)
                # Work on this thread while the move runs on its own.
                busy = torch.randn(256, 256)
                for _ in range(20):
                    busy = torch.tanh(busy @ busy.T / 256)
                handle.wait()
            else:
                ra.move(A, B, keep_source=True)
            res["trained"].append((logits_a, _eval(sh_b, tokens), _mismatches(key_tensors(sh_a), trained)))
            ra.release(B)  # the generation copy is dropped; A is still current

        # Offload the destination copy to host memory and back; a move from an offloaded copy.
        ra.move(A, B, keep_source=True)
        ra.offload(B)
        res["b_resident_offloaded"] = resident_bytes(sh_b.module)
        ra.reload(B)
        res["logits_b_reloaded"] = _eval(sh_b, tokens)
        ra.offload(A)
        ra.move(A, B)
        res["logits_b_from_offloaded"] = _eval(sh_b, tokens)
        results.append(res)
        dist.barrier()
    return results


JOBS = (
    [(LLAMA, a, b) for a, b in LLAMA_PAIRS]
    + [(GPT2, a, b) for a, b in GPT2_PAIRS]
    + [(QWEN_VALUE, a, b) for a, b in QWEN_PAIRS]
)


@pytest.fixture(scope="module")
def world() -> list[list[dict]]:
    """Every pair's per-rank results, from one spawned world of 4 processes."""
    per_rank = spawn(_world, WORLD, JOBS, timeout_s=240.0)
    return [[per_rank[r][i] for r in range(WORLD)] for i in range(len(JOBS))]


def _reported(ranks: list[dict], value: Any, side: int) -> torch.Tensor:
    """The value reported by replica 0's last stage, tp rank 0, of layout A (side 0) or B (1)."""
    got = [value(r) for r in ranks if r["reporter"][side]]
    assert len(got) == 1 and got[0] is not None
    return got[0]


def _gather_canonical(spec: ModelSpec, layout: Layout, ranks: list[dict]) -> dict[str, torch.Tensor]:
    """Canonical tensors from the destination shards; every replica and tied copy must agree."""
    out: dict[str, torch.Tensor] = {}
    for s in range(layout.pp):
        for ps in stage_param_specs(spec, layout.pp, s):
            for d in range(layout.dp):
                parts = [ranks[layout.rank_at(d, t, s)]["b_locals"][ps.key] for t in range(layout.tp)]
                whole = ps.from_locals(parts)
                if ps.tp_dim is None:
                    for part in parts:  # replicated: every tp rank holds the same bytes
                        assert torch.equal(part, parts[0]), ps.key
                if ps.key in out:
                    assert torch.equal(out[ps.key], whole), f"{ps.key}: copies differ under {layout}"
                else:
                    out[ps.key] = whole
    return out


def _check_pair(spec_kw: dict[str, Any], ranks: list[dict]) -> None:
    spec = _spec(spec_kw)
    a_text, b_text = ranks[0]["pair"]
    A, B = Layout.parse(a_text).resolve(WORLD), Layout.parse(b_text).resolve(WORLD)
    want = random_canonical(spec, seed=SEED)

    # A -> B -> A restores every parameter bit for bit.
    assert sum(r["roundtrip_mismatch"] for r in ranks) == 0

    # The logits under B equal those under A. Layouts reduce in different orders: 1e-5 absolute
    # on logits of magnitude ~0.5 (measured differences are ~1e-7).
    la = _reported(ranks, lambda r: r["logits_a"], 0)
    lb = _reported(ranks, lambda r: r["logits_b"], 1)
    assert la.shape == lb.shape and la.shape[:2] == (4, 8)
    assert la.abs().max() > 0.05
    torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)

    # Exporting B to HF gives the original tensors, bit for bit; so does every replica and
    # tied copy of B's shards.
    (hf,) = [r["hf_b"] for r in ranks if r["hf_b"] is not None]
    hf_want = canonical_to_hf(spec, want)
    assert sorted(hf) == sorted(hf_want)
    for k in hf_want:
        assert torch.equal(hf[k], hf_want[k]), k
    got = _gather_canonical(spec, B, ranks)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k

    # After each training step under A and a move to B the logits are the trained model's; the
    # second step runs on A's kept optimizer state after B was dropped.
    before = la
    for step in range(2):
        lat = _reported(ranks, lambda r, s=step: r["trained"][s][0], 0)
        lbt = _reported(ranks, lambda r, s=step: r["trained"][s][1], 1)
        assert (lat - before).abs().max() > 1e-4  # the step changed the model
        torch.testing.assert_close(lbt, lat, atol=1e-5, rtol=0)
        assert sum(r["trained"][step][2] for r in ranks) == 0  # keep_source left A untouched
        before = lat
    # Offloading to host and back changes nothing (same layout: bit-identical), and neither
    # does moving from an offloaded copy.
    assert torch.equal(_reported(ranks, lambda r: r["logits_b_reloaded"], 1), lbt)
    assert torch.equal(_reported(ranks, lambda r: r["logits_b_from_offloaded"], 1), lbt)

    # Bytes: sent == received == the plan's lower bound; local copies make up the rest.
    cost = realloc_bytes(spec, A, B, gpus_per_node=2, element_size=4)
    sent = sum(r["stats_ab"].bytes_sent for r in ranks)
    assert sent == sum(r["stats_ab"].bytes_received for r in ranks) == cost.lower_bound_bytes
    local = sum(r["stats_ab"].bytes_local for r in ranks)
    assert sent + local == sum(r["resident"][1] for r in ranks) > 0
    assert all(r["stats_ab"].staging_bytes <= BUCKET for r in ranks)

    for r in ranks:
        # After A -> B the source is freed and B holds exactly its shard; B is freed on the
        # way back and while offloaded.
        n_b = sum(p.numel() for p in r["b_locals"].values()) * 4
        assert r["resident"] == (0, n_b)
        assert r["holds"] == (False, B.coords(r["rank"]) is not None)
        assert r["b_resident_after_back"] == 0
        assert r["b_resident_offloaded"] == 0
        # Ranks outside both layouts take no part.
        if A.coords(r["rank"]) is None and B.coords(r["rank"]) is None:
            st = r["stats_ab"]
            assert st.bytes_sent == st.bytes_received == st.bytes_local == st.staging_bytes == 0


@pytest.mark.parametrize("i", range(len(JOBS)), ids=[f"{kw['family']}:{a}->{b}" for kw, a, b in JOBS])
def test_pair(world: list[list[dict]], i: int) -> None:
    """Every check of the module docstring for one pair."""
    _check_pair(JOBS[i][0], world[i])


def test_messages_are_bucketed(world: list[list[dict]]) -> None:
    """Small buckets cut the move into many messages, none above half a bucket."""
    ranks = world[0]
    msgs = sum(r["stats_ab"].messages_sent for r in ranks)
    sent = sum(r["stats_ab"].bytes_sent for r in ranks)
    assert msgs >= math.ceil(sent / (BUCKET // 2))
    assert max(r["stats_ab"].rounds for r in ranks) > 1
