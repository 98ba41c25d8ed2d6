"""The planner's cost model: FLOP counts, monotonicity, parallelism effects, communication formulas."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from lightning_real.dataflow import MFC
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.planner.cost import CallCost, Link, grad_reduction_exposed
from lightning_real.planner.cost import call_cost as _price
from lightning_real.planner.flops import forward_flops, generate_flops, train_flops
from lightning_real.planner.hardware import H100, Cluster
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.workload import GPU_FEATURES

NODE = Cluster(1, 8, H100)
Call = tuple[MFC, ModelSpec]


def _call(kind: str, size: str = "7b", batch: int = 64, prompt: int = 128, gen: int = 128) -> Call:
    mfc = MFC(kind, "actor", kind, (), (), batch_size=batch, prompt_len=prompt, gen_len=gen)  # type: ignore[arg-type]
    return mfc, llama2_spec(size)


def call_cost(
    c: Call, dp: int, tp: int, pp: int, m: int, cluster: Cluster, features=GPU_FEATURES
) -> CallCost:  # type: ignore[no-untyped-def]
    return _price(c[0], c[1], dp, tp, pp, m, cluster, features)


def test_forward_flops_match_closed_form_mha() -> None:
    # LLaMA-2 7B (no GQA): per layer 4h^2 (q, k, v, o) + 3hf (SwiGLU) weights; causal attention
    # 2*h*s*(s+1) per sequence and layer; head 2hV per token. Exact integer arithmetic.
    s = llama2_spec("7b")
    h, f, L, V = 4096, 11008, 32, 32000
    b, n = 3, 200
    expected = 2 * b * n * (L * (4 * h * h + 3 * h * f) + h * V) + b * L * 2 * h * n * (n + 1)
    assert forward_flops(s, b, n) == expected
    assert train_flops(s, b, n) == 3 * expected


def test_forward_flops_match_closed_form_gqa() -> None:
    # LLaMA-2 70B: 8 kv heads of 128, so k and v projections are h x 1024 each.
    s = llama2_spec("70b")
    h, f, L, V, kv = 8192, 28672, 80, 32000, 1024
    b, n = 2, 64
    expected = 2 * b * n * (L * (2 * h * h + 2 * h * kv + 3 * h * f) + h * V) + b * L * 2 * h * n * (n + 1)
    assert forward_flops(s, b, n) == expected


def test_flops_are_about_two_per_parameter_per_token() -> None:
    # At short context the weights dominate: forward ~ 2 * params * tokens (embedding lookup is free,
    # so counting all params overshoots by the embedding share, ~2% for 7B). Tolerance 4%.
    s = llama2_spec("7b")
    ratio = forward_flops(s, 1, 16) / (2 * s.num_params() * 16)
    assert 0.96 < ratio < 1.0


def test_generate_flops_is_prefill_plus_decode_steps() -> None:
    s = tiny_spec("llama")
    h, p, g, b = s.hidden_size, 10, 5, 2
    # decode step at position i (1-based, i = p+1 .. p+g-1) attends to i keys
    per_token_weights = 2 * s.num_layers * _w(s)
    decode = sum(
        b * (per_token_weights + 4 * h * s.num_layers * i + 2 * h * s.vocab_size) for i in range(p + 1, p + g)
    )
    prefill = b * (p * per_token_weights + s.num_layers * 2 * h * p * (p + 1) + 2 * h * s.vocab_size)
    assert generate_flops(s, b, p, g) == pytest.approx(prefill + decode, rel=1e-12)


def _w(s) -> int:  # type: ignore[no-untyped-def]
    h, f = s.hidden_size, s.ffn_hidden_size
    kv = s.num_kv_heads * s.head_dim
    return h * (h + 2 * kv) + h * h + 3 * h * f


@pytest.mark.parametrize("kind", ["generate", "inference", "train"])
def test_time_grows_with_batch_and_length(kind: str) -> None:
    lay = (2, 2, 2, 2)
    times_b = [call_cost(_call(kind, batch=b), *lay, NODE).time for b in (32, 64, 128, 256)]
    times_g = [call_cost(_call(kind, gen=g), *lay, NODE).time for g in (64, 128, 256, 512)]
    times_p = [call_cost(_call(kind, prompt=p), *lay, NODE).time for p in (64, 128, 256)]
    for ts in (times_b, times_g, times_p):
        assert all(a < b for a, b in itertools.pairwise(ts)), ts


@pytest.mark.parametrize("kind", ["generate", "inference", "train"])
def test_tensor_parallelism_lowers_per_device_compute(kind: str) -> None:
    compute = [call_cost(_call(kind), 1, tp, 1, 1, NODE).parts["compute"] for tp in (1, 2, 4, 8)]
    assert all(a > b for a, b in itertools.pairwise(compute)), compute
    # ... and adds all-reduce time that grows with the degree
    comm = [call_cost(_call(kind), 1, tp, 1, 1, NODE).parts["tp_comm"] for tp in (1, 2, 4, 8)]
    assert comm[0] == 0 and all(a < b for a, b in itertools.pairwise(comm)), comm


def test_large_batch_training_is_compute_bound() -> None:
    # 7B train over 64 x 256 tokens on 8 GPUs (dp=8): compute is train FLOPs / (8 * effective rate)
    # plus the elementwise passes and layer overheads, which add under 25% here.
    c = _call("train", batch=64, prompt=128, gen=128)
    cost = call_cost(c, 8, 1, 1, 1, NODE)
    ideal = train_flops(c[1], 64, 256) / (8 * H100.flops)
    assert ideal < cost.parts["compute"] < 1.25 * ideal


def test_decode_is_bandwidth_bound() -> None:
    # One sequence, one replica: each decode step streams every weight once; compute is tiny.
    c = _call("generate", batch=1, prompt=16, gen=65)
    cost = call_cost(c, 1, 1, 1, 1, NODE)
    weight_bytes = 2 * c[1].num_params()
    per_step = weight_bytes / H100.mem_bw
    # 64 decode steps + a prefill; each step also pays the fixed decode-step cost (sampling, host
    # sync); a layer's launches hide behind its weight traffic (156 us > 100 us). Tolerance 15%.
    expected = 64 * (per_step + H100.step_overhead)
    assert cost.time == pytest.approx(expected, rel=0.15)
    # doubling the batch barely changes a bandwidth-bound step (< 5%)
    c2 = _call("generate", batch=2, prompt=16, gen=65)
    assert call_cost(c2, 1, 1, 1, 1, NODE).time < 1.05 * cost.time


def test_microbatches_shrink_the_pipeline_bubble() -> None:
    c = _call("train", batch=64)
    t = [
        call_cost(c, 1, 2, 4, m, NODE).parts["pp_bubble"] / call_cost(c, 1, 2, 4, m, NODE).time
        for m in (1, 4, 16, 64)
    ]
    assert all(a > b for a, b in itertools.pairwise(t)), t
    # with m = 1 the 1F1B pass is sum of 4 stages: 3 of 4 stage-times are bubble (~75%, last stage heavier)
    assert 0.6 < t[0] < 0.8


def test_link_formulas() -> None:
    link = Link(bw=100e9, latency=10e-6)
    # ring all-reduce: 2 (n-1)/n bytes / bw + ceil(log2 n) latencies
    assert link.allreduce(8e9, 8) == pytest.approx(2 * 7 / 8 * 8e9 / 100e9 + 3 * 10e-6)
    assert link.allgather(8e9, 4) == pytest.approx(3 / 4 * 8e9 / 100e9 + 2 * 10e-6)
    assert link.allreduce(1e9, 1) == 0.0
    assert link.send(1e9) == pytest.approx(1e9 / 100e9 + 10e-6)


def test_cross_node_groups_use_the_slow_link() -> None:
    two = Cluster(2, 8, H100)
    c = _call("train", batch=64)
    # dp=16 over two nodes crosses InfiniBand; dp=8 (one node) stays on NVLink
    inter = call_cost(c, 16, 1, 1, 1, two).parts["dp_comm"]
    intra = call_cost(c, 8, 1, 1, 1, NODE).parts["dp_comm"]
    assert inter > 5 * intra


def test_grad_reduction_formula() -> None:
    link = Link(bw=100e9, latency=10e-6)
    nbytes, elems = 4e9, 10**9
    # unbucketed: one collective, all of it after the backward
    assert grad_reduction_exposed(link, nbytes, 8, False, None, elems, 5.0) == link.allreduce(nbytes, 8)
    assert grad_reduction_exposed(link, nbytes, 8, True, None, elems, 5.0) == link.allgather(nbytes, 8)
    # 10 buckets, a long backward: only the last bucket's share shows
    total = 10 * link.allreduce(nbytes / 10, 8)
    assert grad_reduction_exposed(link, nbytes, 8, False, elems // 10, elems, 5.0) == pytest.approx(
        total / 10
    )
    # a backward shorter than the reduction: the rest of it shows
    assert grad_reduction_exposed(link, nbytes, 8, False, elems // 10, elems, 0.01) == pytest.approx(
        total - 0.01
    )
    # ZeRO-1: a reduce per bucket and one per replica boundary (17 collectives of 10 buckets' bytes)
    zero = 17 * link.allgather(nbytes / 17, 8)
    assert grad_reduction_exposed(link, nbytes, 8, True, elems // 10, elems, 0.0) == pytest.approx(zero)
    assert grad_reduction_exposed(link, nbytes, 1, False, elems // 10, elems, 0.0) == 0.0


def test_bucketed_reduction_hides_behind_the_backward() -> None:
    # 64 rows per replica: the last backward outlasts the reduction, only the last bucket shows
    c = _call("train", batch=512)
    for opt in ("replicated", "distributed"):
        f = replace(GPU_FEATURES, optimizer=opt)
        over = call_cost(c, 8, 1, 1, 1, NODE, f)
        flat = call_cost(c, 8, 1, 1, 1, NODE, replace(f, grad_bucket_elems=None))
        # the same work, less of the reduction exposed (ZeRO-1's parameter all-gather stays)
        assert over.parts["dp_comm"] < (0.1 if opt == "replicated" else 0.6) * flat.parts["dp_comm"]
        assert over.time < flat.time
        assert over.parts["compute"] == flat.parts["compute"]


def test_distributed_optimizer_shrinks_optimizer_time() -> None:
    c = _call("train", batch=64)
    zero = call_cost(c, 8, 1, 1, 1, NODE, replace(GPU_FEATURES, optimizer="distributed")).parts["optimizer"]
    full = call_cost(c, 8, 1, 1, 1, NODE, replace(GPU_FEATURES, optimizer="replicated")).parts["optimizer"]
    # ZeRO-1 over dp=8: each rank updates an eighth of the parameters
    assert zero == pytest.approx(full / 8, rel=1e-9)
    assert math.isfinite(zero) and zero > 0


def test_unfused_attention_costs_score_passes_and_memory() -> None:
    c = _call("train", batch=16, prompt=512, gen=512)
    flash = call_cost(c, 1, 8, 1, 4, NODE, replace(GPU_FEATURES, attention="sdpa"))
    plain = call_cost(c, 1, 8, 1, 4, NODE, replace(GPU_FEATURES, attention="local"))
    assert plain.time > flash.time
    # 4 sequences per microbatch, 1F1B with one stage keeps 1 microbatch: 32 layers x 4 heads
    # per tp rank x 1024^2 fp32 probabilities per sequence
    extra = 4 * 32 * (32 / 8) * 1024 * 1024 * 4
    assert plain.memory.activations - flash.memory.activations == pytest.approx(extra)


def test_bucket_size_is_a_recipe_key_the_runtime_and_planner_share() -> None:
    from lightning_real.features import GRAD_BUCKET_ELEMS, RuntimeFeatures
    from lightning_real.models.train import TrainConfig
    from lightning_real.recipes.errors import RecipeError
    from lightning_real.recipes.load import load_recipe

    # one default: the engine's buckets are the ones the planner prices
    assert RuntimeFeatures().grad_bucket_elems == GRAD_BUCKET_ELEMS == TrainConfig().bucket_elems
    r = load_recipe("recipes/tiny/sft.yaml", ["engine.grad_bucket_elems=null"])
    assert r.engine.grad_bucket_elems is None
    assert "gradient reduction not overlapped" in r.engine.describe()
    with pytest.raises(
        RecipeError, match=r"'engine\.grad_bucket_elems': 0 .*allowed: null or an integer >= 1"
    ):
        load_recipe("recipes/tiny/sft.yaml", ["engine.grad_bucket_elems=0"])
