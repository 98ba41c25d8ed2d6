"""The planner's memory model and the whole-plan memory check."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lightning_real.dataflow import MFC
from lightning_real.layout import Layout
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.planner.hardware import H100, Cluster
from lightning_real.planner.memory import MemoryBreakdown, fits, stage_params
from lightning_real.planner.memory import call_memory as _memory
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.simulate import simulate
from lightning_real.planner.workload import GPU_FEATURES, ppo_workload
from lightning_real.plans import Plan

Call = tuple[MFC, ModelSpec]


def _train(size: str) -> Call:
    return MFC("t", "actor", "train", (), (), batch_size=8, prompt_len=128, gen_len=128), llama2_spec(size)


def call_memory(c: Call, dp: int, tp: int, pp: int, m: int, features=GPU_FEATURES) -> MemoryBreakdown:  # type: ignore[no-untyped-def]
    # GPU_FEATURES: bf16-mixed (2-byte weights), ZeRO-1 when dp > 1, SDPA attention
    return _memory(c[0], c[1], dp, tp, pp, m, features)


def test_70b_with_adam_does_not_fit_one_gpu() -> None:
    mem = call_memory(_train("70b"), 1, 1, 1, 8)
    n = llama2_spec("70b").num_params()
    # bf16 weights 2 B, fp32 grads 4 B, fp32 master + Adam moments 12 B per parameter: 18 B each
    assert mem.params == 2 * n and mem.grads == 4 * n and mem.optimizer == 12 * n
    assert mem.total > 1.2e12
    reason = fits(mem, H100.usable_mem)
    assert reason is not None and "optimizer" in reason and "72.0 GB usable" in reason


def test_7b_training_fits_a_node_only_when_split() -> None:
    assert fits(call_memory(_train("7b"), 1, 1, 1, 8), H100.usable_mem) is not None
    assert fits(call_memory(_train("7b"), 1, 8, 1, 8), H100.usable_mem) is None


def test_stage_params_sum_to_the_model() -> None:
    spec = llama2_spec("7b")
    assert sum(stage_params(spec, 1, 1)) == spec.num_params()
    assert sum(stage_params(spec, 1, 4)) == spec.num_params()
    # tp=8 splits every matrix and keeps norms whole: the 8 shards hold the model plus 7 extra norm copies
    norms = (2 * spec.num_layers + 1) * spec.hidden_size
    assert 8 * sum(stage_params(spec, 8, 1)) == spec.num_params() + 7 * norms


def test_distributed_optimizer_splits_states_over_dp() -> None:
    c = _train("7b")
    a = call_memory(c, 4, 2, 1, 8, replace(GPU_FEATURES, optimizer="distributed"))
    b = call_memory(c, 4, 2, 1, 8, replace(GPU_FEATURES, optimizer="replicated"))
    assert a.optimizer == pytest.approx(b.optimizer / 4)
    assert a.params == b.params and a.grads == b.grads


def test_kv_cache_of_generation() -> None:
    spec = llama2_spec("70b")
    c = MFC("g", "actor", "generate", (), (), batch_size=512, prompt_len=128, gen_len=896), spec
    mem = call_memory(c, 4, 8, 2, 2)
    # 128 sequences per replica in 2 rounds: 64 sequences x 1024 tokens x 40 layers per stage x
    # (k, v) x 1024/8 x 2 bytes (each round keeps the cache of its own rows)
    assert mem.kv_cache == 64 * 1024 * 40 * 2 * 128 * 2


def test_more_microbatches_hold_fewer_activations() -> None:
    c = _train("13b")
    acts = {m: call_memory(c, 1, 4, 2, m).activations for m in (1, 2, 4, 8)}
    # 1F1B on 2 stages keeps min(m, 2) microbatches of 8/m sequences: 8, 8, 4, 2 sequences
    assert acts[1] == acts[2] == pytest.approx(2 * acts[4]) == pytest.approx(4 * acts[8])


def test_simulator_rejects_a_plan_that_does_not_fit() -> None:
    w = ppo_workload(llama2_spec("7b"), batch_size=64, prompt_len=128, gen_len=128)
    cluster = Cluster(1, 8, H100)
    one = Layout(1, 1, 1, (0,))
    plan = Plan({n: one for n in w.names}, {n: 8 for n in w.names}, "one-gpu")
    res = simulate(w, plan, cluster)
    assert not res.feasible and res.time == float("inf")
    assert "actor_gen on d1t1p1@0 needs" in res.reason  # type: ignore[operator]


def test_resident_states_count_against_other_calls() -> None:
    # Tiny models on a tiny device: each call fits alone, but the actor's and critic's
    # training states living on the same device push the generation over.
    spec = tiny_spec(
        "llama", hidden_size=256, num_heads=4, num_kv_heads=2, ffn_hidden_size=512, vocab_size=4096
    )
    w = ppo_workload(spec, batch_size=8, prompt_len=64, gen_len=64)
    lay = Layout(1, 1, 1, (0,))
    gen = call_memory((w.call("actor_gen"), w.spec("actor_gen")), 1, 1, 1, 1)
    hw = H100.__class__(**{**H100.__dict__, "mem_bytes": 1.4 * gen.total / 0.9})
    res = simulate(w, Plan({n: lay for n in w.names}, {n: 1 for n in w.names}), Cluster(1, 1, hw))
    assert not res.feasible and "states of models living there" in res.reason  # type: ignore[operator]
