"""Forward under every layout equals transformers' own forward (fp32) on real gloo groups."""

from __future__ import annotations

import pytest
import torch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout, LayoutError
from lightning_real.models.build import BuildOptions
from lightning_real.models.forward import (
    attention_mask_4d,
    forward_logits,
    forward_logprobs,
    forward_values,
    microbatches,
    position_ids,
)
from lightning_real.models.hf import hf_model
from lightning_real.models.masks import model_mask, next_token_valid
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import check_layout, tiny_spec

# fp32 on CPU: megatron and transformers sum in different orders. Observed differences are
# about 1e-6 on logits of magnitude ~1; 1e-5 leaves room for that and nothing else (a wrong
# head split or position is off by >1e-2).
ATOL = 1e-5
# d1t1p1@0 runs on one rank of the two-process world (the other rank sits it out);
# d1t1p3@1-3 has uneven stages (1, 2, 1 layers) on ranks that do not start at 0.
LAYOUTS_2 = ["d1t1p1@0", "d1t2p1", "d1t1p2", "d2t1p1"]
LAYOUTS_4 = ["d1t2p2", "d2t1p2", "d2t2p1", "d1t1p3@1-3"]
FAMILIES = ["llama", "qwen2", "gpt2"]
# (family, head, layout) of the packed-row checks in the two-process world.
PACKED = [("llama", "lm", "d1t2p1"), ("gpt2", "lm", "d1t1p2"), ("gpt2", "value", "d1t2p1")]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (4, 12), generator=g)
    pad = torch.ones(4, 12, dtype=torch.long)
    pad[1, :3] = 0  # left padding of different lengths
    pad[3, :5] = 0
    return ids * pad, pad


def _packed_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Two rows: [a | b] and [c | d | padding], with the sequences on their own."""
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 250, (n,), generator=g) for n in (5, 7, 4, 6)]
    ids = torch.zeros(2, 12, dtype=torch.long)
    seg = torch.zeros(2, 12, dtype=torch.long)
    ids[0] = torch.cat(seqs[:2])
    seg[0, :5], seg[0, 5:] = 1, 2
    ids[1, :10] = torch.cat(seqs[2:])
    seg[1, :4], seg[1, 4:10] = 1, 2
    return ids, (seg > 0).long(), seg, seqs


def _spans() -> list[tuple[int, int, int]]:
    """(row, start, length) of each packed sequence, in the order of ``_packed_batch``'s list."""
    return [(0, 0, 5), (0, 5, 7), (1, 0, 4), (1, 4, 6)]


def _rows(lay: Layout, rank: int, b: int) -> tuple[int, int]:
    c = lay.coords(rank)
    assert c is not None
    return c[0] * b // lay.dp, (c[0] + 1) * b // lay.dp


def _world(rank: int, world: int, layouts: list[str], packed: bool) -> dict:
    reg = GroupRegistry()
    ids, pad = _batch()
    out: dict = {}
    for fam in FAMILIES:
        for head in ("lm", "value"):
            spec = tiny_spec(fam, head)
            can = random_canonical(spec, seed=7)
            for lay_s in layouts:
                lay = Layout.parse(lay_s).resolve(world)
                shard = ModelShard.from_canonical(spec, reg.for_layout(lay), can)
                if not shard.member:
                    continue
                lo, hi = _rows(lay, rank, 4)
                n_mbs = 2 if hi - lo >= 2 else 1
                if head == "lm":
                    logits = forward_logits(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs)
                    lp = forward_logprobs(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs)
                    lp_t = forward_logprobs(shard, ids[lo:hi], pad[lo:hi], temperature=0.7)
                    out[(fam, head, lay_s)] = (lo, hi, logits, lp, lp_t)
                else:
                    values = forward_values(shard, ids[lo:hi], pad[lo:hi], n_mbs=n_mbs)
                    out[(fam, head, lay_s)] = (lo, hi, values)
    if packed:
        pids, ppad, seg, seqs = _packed_batch()
        for fam, head, lay_s in PACKED:
            spec = tiny_spec(fam, head)
            lay = Layout.parse(lay_s).resolve(world)
            shard = ModelShard.from_canonical(spec, reg.for_layout(lay), random_canonical(spec, seed=3))
            run = forward_logprobs if head == "lm" else forward_values
            together = run(shard, pids, ppad, n_mbs=2, segment_ids=seg)
            alone = [run(shard, s[None], torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs]
            out[("packed", fam, head, lay_s)] = (together, alone)
    return out


def _reference(fam: str, head: str, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    spec = tiny_spec(fam, head)
    model = hf_model(spec, random_canonical(spec, seed=7))
    ids, pad = _batch()
    with torch.no_grad():
        if head == "lm":
            logits = model(input_ids=ids, attention_mask=pad, position_ids=position_ids(pad)).logits
            lp = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            return logits, lp
        base = model.transformer if fam == "gpt2" else model.model
        h = base(input_ids=ids, attention_mask=pad, position_ids=position_ids(pad)).last_hidden_state
        return (h @ model.score.weight.t()).squeeze(-1), None


def _check(results: list[dict], layouts: list[str], world: int) -> float:
    """Assert every rank of every layout matches transformers; return the largest difference."""
    _, pad = _batch()
    real = pad.bool()
    valid = next_token_valid(pad)
    worst = 0.0
    for fam in FAMILIES:
        ref_logits, ref_lp = _reference(fam, "lm")
        _, ref_lp_t = _reference(fam, "lm", temperature=0.7)
        ref_values, _ = _reference(fam, "value")
        for lay_s in layouts:
            lay = Layout.parse(lay_s).resolve(world)
            for rank in range(world):
                if lay.coords(rank) is None:
                    assert (fam, "lm", lay_s) not in results[rank]
                    continue
                # every rank of the replica (all tp and pp ranks) holds the results
                lo, hi, logits, lp, lp_t = results[rank][(fam, "lm", lay_s)]
                m, v = real[lo:hi], valid[lo:hi]
                errs = [
                    (logits[m] - ref_logits[lo:hi][m]).abs().max(),
                    (lp[v] - ref_lp[lo:hi][v]).abs().max(),
                    (lp_t[v] - ref_lp_t[lo:hi][v]).abs().max(),
                ]
                lo, hi, values = results[rank][(fam, "value", lay_s)]
                errs.append((values[m] - ref_values[lo:hi][m]).abs().max())
                assert max(errs) < ATOL, (fam, lay_s, rank, errs)
                worst = max(worst, *(float(e) for e in errs))
    return worst


def _check_packed(results: list[dict]) -> float:
    """Packed rows give each sequence the log-probs/values it gets alone (within ATOL)."""
    _, ppad, seg, _ = _packed_batch()
    valid = next_token_valid(ppad, seg)
    worst = 0.0
    for fam, head, lay_s in PACKED:
        for res in results:
            together, alone = res[("packed", fam, head, lay_s)]
            for (row, start, n), single in zip(_spans(), alone):
                if head == "lm":
                    # position t scores token t+1: n-1 scores per sequence, none across a boundary
                    got = together[row, start : start + n - 1]
                    assert bool(valid[row, start : start + n - 1].all())
                else:
                    got = together[row, start : start + n]
                err = float((got - single).abs().max())
                assert err < ATOL, (fam, head, lay_s, row, start, err)
                worst = max(worst, err)
    return worst


def test_two_processes_match_transformers_and_pack():
    results = spawn(_world, 2, LAYOUTS_2, True)
    print(f"max |diff| vs transformers: {_check(results, LAYOUTS_2, 2):.2e}")
    print(f"max |diff| packed vs alone: {_check_packed(results):.2e}")


def test_four_processes_match_transformers():
    results = spawn(_world, 4, LAYOUTS_4, False)
    print(f"max |diff| vs transformers: {_check(results, LAYOUTS_4, 4):.2e}")


def test_masks_and_positions():
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids(pad).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 3]]
    seg = torch.tensor([[1, 1, 2, 2, 2], [1, 1, 1, 2, 0]])
    full = torch.ones_like(pad)
    assert position_ids(full, seg).tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 0, 0]]
    m = attention_mask_4d(pad)
    assert m.shape == (2, 1, 5, 5)
    allowed = ~m[0, 0]
    # row 0: real tokens 2..4 see real tokens at or before them; a padding token sees itself only
    assert allowed[4].tolist() == [False, False, True, True, True]
    assert allowed[1].tolist() == [False, True, False, False, False]
    packed = ~attention_mask_4d(full, seg)[0, 0]
    assert packed[4].tolist() == [False, False, True, True, True]  # segment 2 starts at 2
    assert packed[1].tolist() == [True, True, False, False, False]
    assert next_token_valid(full, seg).tolist() == [[True, False, True, True], [True, True, False, False]]


def test_bad_inputs_are_named():
    ids = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="n_mbs=4 must be between 1 and the batch size 3"):
        microbatches(ids, torch.ones_like(ids), 4)
    with pytest.raises(ValueError, match=r"must both be \[batch, seq\]"):
        microbatches(ids, torch.ones(3, 5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="segment_ids shape"):
        attention_mask_4d(torch.ones(3, 4), torch.ones(3, 5))


@pytest.mark.parametrize("bad", ["d3t1p1", "d1t3p1"])
def test_layout_that_does_not_fit_is_rejected(bad):
    with pytest.raises(LayoutError):
        check_layout(tiny_spec("llama"), Layout.parse(bad).resolve(4))


def _unpadded(rank: int, world: int) -> dict:
    reg = GroupRegistry()
    ids, _ = _batch()
    ids = ids.clamp(min=3)  # no padding anywhere: the model gets no mask at all
    full = torch.ones_like(ids)
    out: dict = {}
    for attention in ("local", "sdpa"):
        for lay_s in ("d1t2p1", "d1t1p2"):
            spec = tiny_spec("llama")
            shard = ModelShard.from_canonical(
                spec,
                reg.for_layout(Layout.parse(lay_s).resolve(world)),
                random_canonical(spec, seed=7),
                BuildOptions(attention=attention),
            )
            out[(attention, lay_s)] = forward_logits(shard, ids, full, n_mbs=2)
    return out


def test_unpadded_batch_runs_without_a_mask():
    ids, pad = _batch()
    ids = ids.clamp(min=3)
    full = torch.ones_like(ids)
    assert model_mask(full) is None
    assert torch.equal(model_mask(pad), attention_mask_4d(pad))
    seg = torch.ones_like(full)
    assert torch.equal(model_mask(full, seg), attention_mask_4d(full, seg))  # packed rows keep theirs
    spec = tiny_spec("llama")
    with torch.no_grad():
        ref = hf_model(spec, random_canonical(spec, seed=7))(input_ids=ids).logits
    for results in spawn(_unpadded, 2):
        for key, logits in results.items():
            # megatron's local attention builds its own causal mask, SDPA takes is_causal;
            # both equal transformers' forward at the module's fp32 tolerance
            assert (logits[..., : spec.vocab_size] - ref).abs().max() < ATOL, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_megatrons_rotation_with_gradients(dtype: torch.dtype) -> None:
    """The hand-fused rotation against megatron-core's ``_apply_rotary_pos_emb_bshd`` on the same
    ``[s, b, n, d]`` input (a strided view, as the split qkv is), values and gradients. It fuses a
    product into the add, so the two round differently: 1e-6 in fp32 (values ~1), one bf16 step
    (2^-7 relative, values up to ~4) in bf16."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from lightning_real.models.attention import rope

    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(7, 2, 3, 24, generator=g).to(dtype)
    inv = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    freqs = torch.outer(torch.arange(7).float(), inv)
    freqs = torch.cat([freqs, freqs], -1)[:, None, None, :]  # megatron's layout: [s, 1, 1, d]
    upstream = torch.randn(7, 2, 3, 8, generator=g).to(dtype)
    results = []
    for fn in (rope, _apply_rotary_pos_emb_bshd):
        x = qkv.clone().requires_grad_(True)
        out = fn(x[..., 8:16], freqs)
        (out.float() * upstream.float()).sum().backward()
        assert x.grad is not None
        results.append((out.detach().float(), x.grad.float()))
    tol = 1e-6 if dtype == torch.float32 else 4 * 2**-7
    for ours, theirs in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=0)
    assert not results[0][1][..., :8].any() and not results[0][1][..., 16:].any()


def _rope_layers(rank: int, world: int) -> tuple[list[str], list[bool]]:
    ids, pad = _batch()
    spec = tiny_spec("llama")
    groups = GroupRegistry().for_layout(Layout(1, 1, 1, (0,)))
    shard = ModelShard.from_canonical(spec, groups, random_canonical(spec, seed=7))
    assert shard.module is not None
    attn = [layer.self_attention for layer in shard.module.decoder.layers]
    forward_logits(shard, ids, pad)
    return [type(a).__name__ for a in attn], [a._rope is None for a in attn]


def test_layers_rotate_with_the_fused_rope_and_keep_no_state() -> None:
    """The SDPA layer spec's self-attention is ``RopeSelfAttention`` (its logits are those the
    transformers-parity tests above check); after a forward it holds no embedding (the rotation
    is handed over within one call only)."""
    (names, cleared), *_ = spawn(_rope_layers, 1)
    assert names and set(names) == {"RopeSelfAttention"}
    assert all(cleared)
