"""Vocabularies that tensor parallelism does not divide: padded per layout, invisible to users.

The distributed checks run in one 2-process gloo world: an HF checkpoint with an odd vocabulary
is loaded under tp=2 and must give transformers' logits, log-probabilities, entropy and greedy
tokens; sampling must draw the same tokens as under tp=1; export and gathering must give the
checkpoint back bit for bit; and a move tp=1 -> tp=2 -> tp=1 must restore every byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_forward import ATOL, _batch

from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.forward import attention_mask_4d, forward_logits, forward_logprobs, position_ids
from lightning_real.models.generate import GenerationConfig, VocabParallelSampler, generate
from lightning_real.models.hf import gather_canonical, hf_model, load_hf, read_canonical, save_hf, write_hf
from lightning_real.models.masks import next_token_valid
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import WORD_EMBEDDINGS, random_canonical, stage_param_specs
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.models.vocab_parallel import (
    next_token_logprobs,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)
from lightning_real.realloc import Reallocator, key_tensors, plan_realloc, realloc_bytes

SPECS = {
    # GPT-2's situation (50257 is odd) at the byte tokenizer's size: tied embeddings, tp=2 pads by one.
    "gpt2": tiny_spec("gpt2", vocab_size=259),
    # A padding multiple above the vocabulary: tp=1 pads 257 to 320, tp=2 to 640, so tp rank 1
    # holds padding only (the hardest case for vocab-parallel reductions and sampling).
    "llama": tiny_spec("llama", vocab_size=257, pad_vocab_to_multiple_of=320),
}
TP1, TP2 = "d1t1p1@0", "d1t2p1"
NEW = 8
# std 0.1 makes tiny random models emit varied tokens (as in tests/test_generate.py).
STD = 0.1
SAMPLING = {
    "plain": GenerationConfig(max_new_tokens=NEW, temperature=0.8, seed=5),
    "filtered": GenerationConfig(max_new_tokens=NEW, top_k=20, top_p=0.9, seed=5),
}


def _truth(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return random_canonical(spec, seed=4, std=STD)


# ---- without processes ------------------------------------------------------------------------------
def test_padded_sizes_follow_megatron():
    gpt2 = tiny_spec("gpt2", vocab_size=50257, pad_vocab_to_multiple_of=128)
    assert gpt2.padded_vocab_size(1) == 50304 and gpt2.padded_vocab_size(8) == 51200
    odd = SPECS["gpt2"]
    assert [odd.padded_vocab_size(tp) for tp in (1, 2, 4)] == [259, 260, 260]
    assert odd.vocab_range(2, 0) == (0, 130) and odd.vocab_range(2, 1) == (130, 259)
    assert SPECS["llama"].vocab_range(2, 1) == (257, 257)  # padding only
    with pytest.raises(ValueError, match=r"pad_vocab_to_multiple_of=0; allowed: an integer >= 1"):
        tiny_spec("llama", pad_vocab_to_multiple_of=0)


@pytest.mark.parametrize("name", list(SPECS))
def test_vocab_rows_round_trip_under_any_tp(name: str):
    """Local slices are padded with zeros, equal in shape on every rank, and reassemble bit-exactly."""
    spec = SPECS[name]
    truth = _truth(spec)
    vocab = [ps for ps in stage_param_specs(spec, 2, 1) + stage_param_specs(spec, 2, 0) if ps.pad_multiple]
    assert {ps.key for ps in vocab} >= {WORD_EMBEDDINGS}
    for ps in vocab:
        for tp in (1, 2, 4):
            parts = [ps.to_local(truth[ps.key], r, tp) for r in range(tp)]
            assert all(p.shape == (spec.padded_vocab_size(tp) // tp, spec.hidden_size) for p in parts)
            for r, p in enumerate(parts):
                lo, hi = spec.vocab_range(tp, r)
                assert torch.equal(p[: hi - lo], truth[ps.key][lo:hi]) and not p[hi - lo :].any()
            assert torch.equal(ps.from_locals(parts), truth[ps.key])


def test_minus_inf_padding_changes_no_logprob_entropy_or_gradient():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5))
    padded = torch.cat([logits, torch.full((2, 5, 6), float("-inf"), dtype=torch.float64)], -1)
    padded.requires_grad_(True)
    lp = vocab_parallel_logprobs(padded, labels, None)
    ent = vocab_parallel_entropy(padded, None)
    full = torch.log_softmax(logits.float(), -1)
    torch.testing.assert_close(lp, full.gather(-1, labels.unsqueeze(-1)).squeeze(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent, -(full.exp() * full).sum(-1), atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(lp.sum() + ent.sum(), padded)
    assert torch.isfinite(grad).all() and not grad[..., 11:].any()


def _split_logprobs(rank: int, world: int, logits: torch.Tensor, labels: torch.Tensor) -> tuple:
    group = GroupRegistry().for_layout(Layout(1, world, 1, tuple(range(world)))).tp
    part = logits.shape[-1] // world
    mine = logits[..., rank * part : (rank + 1) * part].clone().requires_grad_(True)
    lp = vocab_parallel_logprobs(mine, labels, group)
    (lp * torch.arange(1.0, 6.0)).sum().backward()  # position weights: a non-uniform upstream gradient
    return lp.detach(), mine.grad


def test_fused_logprobs_under_tp2_equal_log_softmax_with_gradients():
    """The fused function against autograd through log_softmax over the whole vocabulary; the
    logits are split over 2 real gloo ranks, 3 padding columns at the end (-inf), labels on both
    halves. fp32 math on both sides: 1e-6."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 16, generator=g)
    logits[..., 13:] = float("-inf")
    labels = torch.randint(0, 13, (2, 5), generator=g)
    ref = logits.clone().requires_grad_(True)
    lp_ref = torch.log_softmax(ref, -1).gather(-1, labels[..., None]).squeeze(-1)
    (lp_ref * torch.arange(1.0, 6.0)).sum().backward()
    assert ref.grad is not None
    for rank, (lp, grad) in enumerate(spawn(_split_logprobs, 2, logits, labels)):
        torch.testing.assert_close(lp, lp_ref.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, ref.grad[..., rank * 8 : (rank + 1) * 8], atol=1e-6, rtol=0)
    assert not ref.grad[..., 13:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_next_token_logprobs_equal_the_sliced_form_with_gradients(dtype: torch.dtype) -> None:
    """Scoring the whole width and dropping the last position gives the sliced form's values and
    gradients (0 at the last position). The same fp32 operations on the same rows on both sides,
    so equal bit for bit; bf16 logits take the path that overwrites their fp32 copy in place."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, 10, generator=g).to(dtype)
    ids = torch.randint(0, 10, (3, 6), generator=g)
    weights = torch.rand(3, 5, generator=g)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    lp_a = next_token_logprobs(a, ids, None)
    lp_b = vocab_parallel_logprobs(b[:, :-1], ids[:, 1:], None)
    assert lp_a.shape == (3, 5) and lp_a.dtype == torch.float32
    assert torch.equal(lp_a, lp_b)
    (lp_a * weights).sum().backward()
    (lp_b * weights).sum().backward()
    assert a.grad is not None and b.grad is not None
    assert torch.equal(a.grad, b.grad) and not a.grad[:, -1].any()
    assert torch.equal(logits, a.detach())  # the input itself is never written
    # against autograd through log_softmax of the same values in fp32: the values to 1e-6 (fp32
    # sums in another order); the gradient, cast to the logits' dtype, within one rounding of it
    # (2^-8 relative in bf16; gradients are at most 1 here)
    ref = logits.float().requires_grad_(True)
    lp_ref = torch.log_softmax(ref[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (lp_ref * weights).sum().backward()
    assert ref.grad is not None
    torch.testing.assert_close(lp_a, lp_ref.detach(), atol=1e-6, rtol=0)
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(a.grad.float(), ref.grad.to(dtype).float(), atol=tol, rtol=0)


def test_fused_logprobs_refuse_a_second_backward():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    lp = vocab_parallel_logprobs(logits, torch.zeros(2, 3, dtype=torch.long), None)
    lp.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        lp.sum().backward()


def test_sampler_skips_padding_and_draws_as_without_it():
    """Noise is drawn for the vocabulary alone, so padding changes no draw."""
    logits = torch.randn(500, 8, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([logits, torch.full((500, 4), float("-inf"))], -1)
    for cfg in (GenerationConfig(temperature=0.7), GenerationConfig(top_k=3), GenerationConfig(top_p=0.7)):
        plain = VocabParallelSampler(cfg, 8, seed=1, device=torch.device("cpu"))(logits)
        with_pad = VocabParallelSampler(cfg, 8, seed=1, device=torch.device("cpu"))(padded)
        assert torch.equal(with_pad[0], plain[0]) and (with_pad[0] < 8).all()
        torch.testing.assert_close(with_pad[1], plain[1], atol=1e-6, rtol=0)


def test_move_bytes_match_the_plan_with_padding():
    """The analytic byte totals stay exact when chunk edges follow each layout's padding."""
    spec = tiny_spec("llama", vocab_size=257, pad_vocab_to_multiple_of=96, num_heads=8, num_kv_heads=4)
    pairs = [
        ("d1t1p1@0", "d1t2p1@0-1"),
        ("d2t2p1", "d1t4p1"),
        ("d1t4p1", "d2t1p2"),
        ("d1t1p2@0-1", "d1t2p1@2-3"),
    ]
    for a, b in pairs:
        src, dst = Layout.parse(a).resolve(4), Layout.parse(b).resolve(4)
        for gpn in (1, 2):
            plan = plan_realloc(spec, src, dst, gpus_per_node=gpn, bucket_bytes=1 << 16)
            cost = realloc_bytes(spec, src, dst, gpus_per_node=gpn)
            got = (cost.bytes_sent, cost.bytes_local, cost.bytes_cross_node, cost.max_recv_bytes)
            assert got == (plan.bytes_sent, plan.bytes_local, plan.bytes_cross_node, plan.max_recv_bytes)


# ---- one 2-process world ------------------------------------------------------------------------------
def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids, pad = _batch()
    return ids[:, :8], pad[:, :8]


def _padding_is_zero(shard: ModelShard) -> bool:
    g = shard.groups
    lo, hi = shard.spec.vocab_range(shard.layout.tp, g.tp_rank)
    return all(not p[hi - lo :].any() for ps, p in shard.params() if ps.pad_multiple)


def _train_probe(shard: ModelShard, ids: torch.Tensor, pad: torch.Tensor) -> dict[str, Any]:
    """Entropy and log-probs straight from the head's vocab slice, and their gradients."""
    g, model = shard.groups, shard.module
    assert model is not None
    dev = next(model.parameters()).device  # the model's own device (CUDA in tests/test_cuda_parity.py)
    ids, pad = ids.to(dev), pad.to(dev)
    out = model(ids, position_ids(pad), attention_mask_4d(pad))
    ent = vocab_parallel_entropy(out, g.tp)
    lp = vocab_parallel_logprobs(out[:, :-1], ids[:, 1:], g.tp)
    (ent.sum() + lp.sum()).backward()
    lo, hi = shard.spec.vocab_range(shard.layout.tp, g.tp_rank)
    grads = [p.grad for _, p in shard.params()]
    res = {
        "entropy": ent.detach(),
        "masked_columns": int(torch.isinf(out).all(0).all(0).sum()),
        "grads_finite": all(bool(torch.isfinite(x).all()) for x in grads),
        "padding_grad": sum(
            float(p.grad[hi - lo :].abs().sum()) for ps, p in shard.params() if ps.pad_multiple
        ),
    }
    model.zero_grad(set_to_none=True)
    return res


def _realloc(spec: ModelSpec, reg: GroupRegistry, ids: torch.Tensor, pad: torch.Tensor) -> dict[str, Any]:
    """tp=1 -> tp=2 -> tp=1: logits on both, canonical tensors on tp=2, every byte back on tp=1."""
    a, b = (Layout.parse(x).resolve(2) for x in (TP1, TP2))
    ra = Reallocator(spec, reg)
    sh_a = ra.adopt(ModelShard.from_canonical(spec, reg.for_layout(a), _truth(spec)))
    orig = {k: v.clone() for k, v in key_tensors(sh_a).items()}
    out: dict[str, Any] = {"logits_a": forward_logits(sh_a, ids, pad) if sh_a.member else None}
    sh_b = ra.move(a, b)
    out["logits_b"] = forward_logits(sh_b, ids, pad)
    out["gathered_b"] = gather_canonical(sh_b)
    out["padding_zero_b"] = _padding_is_zero(sh_b)
    ra.move(b, a)
    out["mismatch"] = sum(int((key_tensors(sh_a)[k] != v).sum()) for k, v in orig.items())
    return out


def _world(rank: int, world: int, root: str) -> dict[str, Any]:
    reg = GroupRegistry()
    tp1, tp2 = (reg.for_layout(Layout.parse(x).resolve(world)) for x in (TP1, TP2))
    ids, pad = _prompts()
    out: dict[str, Any] = {}
    for name, spec in SPECS.items():
        src = Path(root) / f"{name}-src"
        shard = load_hf(src, tp2, pad_vocab_to_multiple_of=spec.pad_vocab_to_multiple_of)
        res: dict[str, Any] = {"spec": shard.spec, "padding_zero": _padding_is_zero(shard)}
        res["shape"] = tuple(dict(shard.module.named_parameters())[WORD_EMBEDDINGS].shape)
        res["logits"] = forward_logits(shard, ids, pad)
        res["logprobs"] = forward_logprobs(shard, ids, pad)
        res["probe"] = _train_probe(shard, ids, pad)
        greedy = GenerationConfig(max_new_tokens=NEW, greedy=True)
        res["greedy"] = generate(shard, ids, pad, greedy).tokens
        res["sampled"] = {k: generate(shard, ids, pad, cfg).tokens for k, cfg in SAMPLING.items()}
        one = ModelShard.from_canonical(spec, tp1, _truth(spec))
        if one.member:
            res["sampled_tp1"] = {k: generate(one, ids, pad, cfg).tokens for k, cfg in SAMPLING.items()}
        res["gathered"] = gather_canonical(shard)
        save_hf(shard, Path(root) / f"{name}-out")
        res["realloc"] = _realloc(spec, reg, ids, pad)
        out[name] = res
    return out


def _hf_reference(spec: ModelSpec) -> dict[str, torch.Tensor]:
    """transformers' logits, next-token log-probs, entropy and greedy tokens on the same prompts."""
    model = hf_model(spec, _truth(spec))
    ids, pad = _prompts()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=pad, position_ids=position_ids(pad)).logits
        greedy = model.generate(
            input_ids=ids, attention_mask=pad, max_new_tokens=NEW, do_sample=False, pad_token_id=0
        )
    logp = torch.log_softmax(logits, -1)
    return {
        "logits": logits,
        "logprobs": logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1),
        "entropy": -(logp.exp() * logp).sum(-1),
        "greedy": greedy,
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("vocab")
    for name, spec in SPECS.items():
        write_hf(spec, _truth(spec), root / f"{name}-src")
    return root, spawn(_world, 2, str(root))


@pytest.mark.parametrize("name", list(SPECS))
def test_tp2_matches_transformers(world: tuple[Path, list[dict[str, Any]]], name: str):
    _, results = world
    spec, ref = SPECS[name], _hf_reference(SPECS[name])
    _, pad = _prompts()
    real, valid = pad.bool(), next_token_valid(pad)
    for res in (r[name] for r in results):
        assert res["spec"] == spec and res["padding_zero"]
        assert res["shape"] == (spec.padded_vocab_size(2) // 2, spec.hidden_size)
        assert res["logits"].shape[-1] == spec.vocab_size
        assert (res["logits"][real] - ref["logits"][real]).abs().max() < ATOL
        assert (res["logprobs"][valid] - ref["logprobs"][valid]).abs().max() < ATOL
        probe = res["probe"]
        assert (probe["entropy"][real] - ref["entropy"][real]).abs().max() < ATOL
        assert probe["grads_finite"] and probe["padding_grad"] == 0.0
        assert torch.equal(res["greedy"], ref["greedy"]), (name, res["greedy"], ref["greedy"])
    width = spec.padded_vocab_size(2) // 2
    masked = [r[name]["probe"]["masked_columns"] for r in results]
    assert masked == [width - (hi - lo) for lo, hi in (spec.vocab_range(2, t) for t in range(2))]


@pytest.mark.parametrize("name", list(SPECS))
def test_sampling_ignores_padding_and_tp(world: tuple[Path, list[dict[str, Any]]], name: str):
    _, results = world
    for key in SAMPLING:
        tp1 = results[0][name]["sampled_tp1"][key]
        assert (tp1 < SPECS[name].vocab_size).all()
        for res in results:
            assert torch.equal(res[name]["sampled"][key], tp1), (name, key)


@pytest.mark.parametrize("name", list(SPECS))
def test_export_gather_and_realloc_give_the_checkpoint_back(
    world: tuple[Path, list[dict[str, Any]]], name: str
):
    import transformers

    root, results = world
    spec, truth = SPECS[name], _truth(SPECS[name])
    gathered, moved = results[0][name]["gathered"], results[0][name]["realloc"]["gathered_b"]
    assert results[1][name]["gathered"] is None
    back = read_canonical(root / f"{name}-out", spec)
    for got in (gathered, moved, back):
        assert sorted(got) == sorted(truth) and all(torch.equal(got[k], truth[k]) for k in truth)
    assert transformers.AutoConfig.from_pretrained(root / f"{name}-out").vocab_size == spec.vocab_size
    logits_a = results[0][name]["realloc"]["logits_a"]
    for res in results:
        r = res[name]["realloc"]
        assert r["mismatch"] == 0 and r["padding_zero_b"]
        assert (r["logits_b"] - logits_a).abs().max() < ATOL
