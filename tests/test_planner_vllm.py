"""The planner prices vLLM generate calls and chooses between the two generation backends."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from lightning_real.dataflow import MFC
from lightning_real.features import RuntimeFeatures, VllmConfig
from lightning_real.layout import Layout
from lightning_real.planner.cost import call_cost, vllm_waves
from lightning_real.planner.hardware import H100, H200, Cluster
from lightning_real.planner.memory import call_memory, vllm_kv_bytes_per_row
from lightning_real.planner.presets import llama2_spec
from lightning_real.planner.search import SearchConfig, search
from lightning_real.planner.simulate import simulate
from lightning_real.planner.space import options
from lightning_real.planner.workload import GPU_FEATURES, Workload, ppo_workload
from lightning_real.plans import Plan, check_plan

NODE = Cluster(1, 8, H100)
H200_NODE = Cluster(1, 8, H200)
SPEC = llama2_spec("7b")
LAYOUTS = {
    "actor_gen": "d4t2p1@0-7",
    "ref_inf": "d2t2p1@0-3",
    "rew_inf": "d2t2p1@0-3",
    "actor_train": "d2t2p1@0-3",
    "critic_inf": "d2t2p1@4-7",
    "critic_train": "d2t2p1@4-7",
}
MBS = {"actor_train": 16, "critic_train": 16, "ref_inf": 4, "rew_inf": 4, "critic_inf": 4}


def _gen(batch: int = 64, prompt: int = 128, gen: int = 128) -> MFC:
    return MFC(
        "actor_gen", "actor", "generate", ("prompts",), ("seq",), batch, prompt_len=prompt, gen_len=gen
    )


def _vllm(**cfg: object) -> RuntimeFeatures:
    return replace(GPU_FEATURES, generation_backend="vllm", vllm=VllmConfig(**cfg))  # type: ignore[arg-type]


def test_generation_runs_in_waves_when_the_kv_cache_is_short() -> None:
    call = _gen(batch=64)
    per_row = vllm_kv_bytes_per_row(call, SPEC, 1, _vllm(), 16)
    # 7B, no GQA: 256 tokens x 32 layers x keys and values x 4096 x 2 bytes per row
    assert per_row == 256 * 32 * 2 * 4096 * 2

    def priced(rows_of_cache: int):  # type: ignore[no-untyped-def]
        f = _vllm(kv_cache_bytes=rows_of_cache * per_row, max_num_seqs=256)
        return call_cost(call, SPEC, 1, 1, 1, 1, NODE, f), vllm_waves(call, SPEC, 1, 1, NODE, f)

    (roomy, w_roomy), (exact, w_exact) = priced(640), priced(64)
    assert w_roomy == w_exact == 1
    assert exact.time == roomy.time  # a cache that holds every row: the single-wave time
    times = {}
    for rows in (64, 63, 48, 32, 31, 16, 8, 1):
        cost, waves = priced(rows)
        assert waves == -(-64 // rows)
        times[rows] = cost.time
        # one engine step per generated token per wave
        assert cost.parts["step_overhead"] == pytest.approx(waves * 128 * H100.vllm_eager_step_overhead)
    # steps: the same number of waves takes (about) the same time, each wave more adds a wave's
    # worth (an uneven last wave, 63 + 1 rows, differs only by its small matmuls' efficiency)
    assert times[63] == pytest.approx(times[32], rel=1e-3) and times[48] == pytest.approx(times[32], rel=1e-3)
    assert (
        times[64] < min(times[63], times[48], times[32]) and max(times[63], times[48], times[32]) < times[31]
    )
    assert times[31] < times[16] < times[8] < times[1]
    assert times[32] - times[64] == pytest.approx(times[31] - times[32], rel=0.05)
    assert times[1] > 10 * times[64]
    # two waves of 32 rows: twice the generation of a 32-row batch that fits at once
    half, _ = priced(32)
    small = call_cost(_gen(batch=32), SPEC, 1, 1, 1, 1, NODE, _vllm(kv_cache_bytes=32 * per_row))
    assert half.parts["compute"] == pytest.approx(2 * small.parts["compute"])
    assert half.parts["step_overhead"] == pytest.approx(2 * small.parts["step_overhead"])
    # with tp=2 the key/value heads are split: twice the rows fit in the same budget
    assert vllm_waves(call, SPEC, 1, 2, NODE, _vllm(kv_cache_bytes=32 * per_row)) == 1
    # not one row fits: vLLM cannot serve the call, and no option offers it
    tiny = _vllm(kv_cache_bytes=per_row - 1)
    assert call_cost(call, SPEC, 1, 1, 1, 1, NODE, tiny).time == float("inf")
    assert not options(call, SPEC, 1, Cluster(1, 1, H100), tiny)


def test_step_overhead_scales_with_the_decode_steps_and_cuda_graphs_lower_it() -> None:
    big = _vllm(kv_cache_bytes=64 << 30)
    graphs = _vllm(kv_cache_bytes=64 << 30, enforce_eager=False)
    for gen in (64, 128, 512):
        c = call_cost(_gen(gen=gen), SPEC, 8, 1, 1, 1, NODE, big)
        assert c.parts["step_overhead"] == pytest.approx(gen * H100.vllm_eager_step_overhead)
        g = call_cost(_gen(gen=gen), SPEC, 8, 1, 1, 1, NODE, graphs)
        assert g.parts["step_overhead"] == pytest.approx(gen * H100.vllm_step_overhead)
        assert g.time < c.time
    assert H100.vllm_step_overhead < H100.vllm_eager_step_overhead <= H100.step_overhead


def test_weight_update_and_logprob_recompute_are_priced() -> None:
    call = _gen(batch=64)
    f = _vllm(kv_cache_bytes=64 << 30)
    cost = call_cost(call, SPEC, 2, 4, 1, 1, NODE, f)
    # every rank hands the whole model in bf16 to vLLM's loaders (the direct path)
    want = H100.vllm_update_overhead + SPEC.num_params() * 2 / H100.mem_bw
    assert cost.parts["weight_update"] == pytest.approx(want)
    # the response log-probs: one inference forward of the batch on the same layout
    inference = replace(call, call_type="inference", output_keys=("logp",))
    fwd = call_cost(inference, SPEC, 2, 4, 1, 1, NODE, GPU_FEATURES)
    assert cost.parts["logprob_recompute"] == pytest.approx(fwd.time)
    assert cost.time == pytest.approx(sum(cost.parts.values()))
    with pytest.raises(ValueError, match="no pipeline parallelism"):
        call_cost(call, SPEC, 2, 2, 2, 1, NODE, f)


def test_vllm_options_are_unpipelined_whole_world_layouts_with_one_microbatch() -> None:
    call = _gen(batch=512, gen=384)
    auto = replace(GPU_FEATURES, generation_backend="auto", vllm=VllmConfig(kv_cache_bytes=16 << 30))
    opts = options(call, SPEC, 8, NODE, auto)
    v = [o for o in opts if o.backend == "vllm"]
    n = [o for o in opts if o.backend == "native"]
    assert v and n
    assert all(o.pp == 1 and o.m == 1 and o.dp * o.tp == 8 for o in v)
    assert any(o.pp > 1 for o in n)  # the native generator keeps its pipelines
    assert {(o.dp, o.tp) for o in v} <= {(8, 1), (4, 2), (2, 4), (1, 8)}
    # half the cluster: vLLM's in-process engines adopt the whole world, so no vllm option
    assert options(call, SPEC, 4, NODE, auto)
    assert all(o.backend == "native" for o in options(call, SPEC, 4, NODE, auto))
    # native only: nothing changes
    assert all(o.backend == "native" for o in options(call, SPEC, 8, NODE, GPU_FEATURES))
    # vllm fixed: only those layouts
    fixed = options(call, SPEC, 8, NODE, replace(auto, generation_backend="vllm"))
    assert fixed and all(o.backend == "vllm" and o.pp == 1 for o in fixed)
    assert not options(call, SPEC, 4, NODE, replace(auto, generation_backend="vllm"))


def test_fixed_vllm_search_places_generation_on_the_whole_world() -> None:
    w = ppo_workload(
        SPEC, batch_size=512, prompt_len=128, gen_len=128, features=_vllm(kv_cache_bytes=16 << 30)
    )
    r = search(w, NODE, SearchConfig(steps=300, seed=0))
    lay = r.plan.layouts["actor_gen"]
    assert lay.pp == 1 and lay.ranks == tuple(range(8)) and r.plan.microbatches["actor_gen"] == 1
    assert r.plan.backends == {"actor_gen": "vllm"}
    assert "weight_update" in r.sim.costs["actor_gen"].parts


def test_fixed_vllm_without_a_fitting_layout_says_why() -> None:
    w = ppo_workload(
        SPEC, batch_size=512, prompt_len=128, gen_len=128, features=_vllm(kv_cache_bytes=1 << 20)
    )
    with pytest.raises(
        ValueError, match=r"generation_backend=vllm needs a dNtTp1 layout over all 8 devices.*KV cache"
    ):
        search(w, NODE, SearchConfig(steps=10))


def test_simulating_a_vllm_plan_checks_the_runtime_rules() -> None:
    w = ppo_workload(
        SPEC, batch_size=512, prompt_len=128, gen_len=128, features=_vllm(kv_cache_bytes=4 << 30)
    )
    base = dict(LAYOUTS)
    assert simulate(w, Plan(base, MBS), NODE).feasible
    with pytest.raises(ValueError, match="vllm backend on d4t1p2@0-7: pp=2"):
        simulate(w, Plan({**base, "actor_gen": "d4t1p2@0-7"}, MBS), NODE)
    with pytest.raises(ValueError, match="4 of the 8 devices"):
        simulate(w, Plan({**base, "actor_gen": "d2t2p1@0-3"}, MBS), NODE)


def _search(w: Workload, features: RuntimeFeatures, steps: int = 1000):  # type: ignore[no-untyped-def]
    return search(w.with_features(features), H200_NODE, SearchConfig(steps=steps, seed=0))


def test_auto_is_no_slower_than_native_on_a_long_generation() -> None:
    from lightning_real.recipes.planning import workload_from_recipe

    w = workload_from_recipe("ppo-7b", gen_len=896)
    native = _search(w, w.features)
    for vcfg in (VllmConfig(), VllmConfig(kv_cache_bytes=32 << 30, enforce_eager=False)):
        feats = replace(w.features, generation_backend="auto", vllm=vcfg)
        auto = _search(w, feats)
        # the native plan is a plan of auto's space, priced the same there ...
        assert simulate(w.with_features(feats), native.plan, H200_NODE).time == pytest.approx(native.sim.time)
        # ... and the search finds one at least as fast (up to the chain's noise: the two searches
        # draw from different option lists, so their last few moves differ)
        assert auto.sim.feasible and auto.sim.time <= native.sim.time * 1.01
        # the plan records what its generate call was priced as
        priced_vllm = "weight_update" in auto.sim.costs["actor_gen"].parts
        assert (auto.plan.backends.get("actor_gen") == "vllm") == priced_vllm
        assert set(auto.plan.backends) <= {"actor_gen"}
    # With the default 1 GiB cache only 2 of a 7B model's 1024-token rows fit per engine rank
    # (tp 1): generation in waves, far slower than the native generator.
    slow = call_cost(w.call("actor_gen"), w.spec("actor_gen"), 8, 1, 1, 1, Cluster(1, 8, H200), _vllm())
    nat = call_cost(w.call("actor_gen"), w.spec("actor_gen"), 8, 1, 1, 1, Cluster(1, 8, H200), w.features)
    assert slow.time > 5 * nat.time


def test_auto_chooses_vllm_where_cuda_graphs_pay_off() -> None:
    from lightning_real.recipes.planning import workload_from_recipe

    # Few rows per replica: the native generator's per-layer launch overhead shows in every
    # decode step; vLLM with CUDA graphs has none.
    w = workload_from_recipe("ppo-7b", gen_len=896, batch_size=64)
    native = _search(w, w.features)
    feats = replace(
        w.features, generation_backend="auto", vllm=VllmConfig(kv_cache_bytes=32 << 30, enforce_eager=False)
    )
    auto = _search(w, feats)
    assert auto.plan.backends == {"actor_gen": "vllm"}
    assert auto.sim.time < native.sim.time
    assert auto.sim.costs["actor_gen"].time < native.sim.costs["actor_gen"].time
    lay = auto.plan.layouts["actor_gen"]
    assert lay.pp == 1 and lay.size == 8
    # the searched plan is a plan the runtime accepts, and it round-trips through its file form
    again = Plan.from_dict(auto.plan.to_dict())
    assert again == auto.plan and again.backends == {"actor_gen": "vllm"}
    assert check_plan(again, w.graph, 8).backends == {"actor_gen": "vllm"}
    assert simulate(w.with_features(feats), again, Cluster(1, 8, H200)).time == pytest.approx(auto.sim.time)


def test_plan_backends_round_trip_through_yaml(tmp_path: Path) -> None:
    p = Plan(
        {"actor_gen": "d4t2p1@0-7", "actor_train": "d2t2p1@0-3"},
        {"actor_gen": 1},
        "x",
        {},
        {"actor_gen": "vllm"},
    )
    assert Plan.from_dict(p.to_dict()).backends == {"actor_gen": "vllm"}
    p.to_yaml(tmp_path / "p.yaml")
    assert Plan.from_yaml(tmp_path / "p.yaml").backends == {"actor_gen": "vllm"}


def test_an_engine_that_is_not_released_stays_resident_between_calls() -> None:
    call = _gen(batch=512, gen=128)
    kept = call_memory(call, SPEC, 4, 2, 1, 1, _vllm(kv_cache_bytes=8 << 30, release=False))
    freed = call_memory(call, SPEC, 4, 2, 1, 1, _vllm(kv_cache_bytes=8 << 30))
    assert kept.total == freed.total  # the call itself needs the same
    assert kept.engine == kept.params > 0 and kept.kv_cache == 8 << 30
    assert kept.kept == kept.engine + kept.kv_cache and freed.kept == 0
    assert kept.transient == pytest.approx(freed.transient - kept.kept)
    # across the plan: every call on the generate call's devices carries the engine
    plans = {}
    for release in (True, False):
        w = ppo_workload(
            SPEC,
            batch_size=512,
            prompt_len=128,
            gen_len=128,
            features=_vllm(kv_cache_bytes=4 << 30, release=release),
        )
        plans[release] = simulate(w, Plan(LAYOUTS, MBS), NODE)
    kept = call_memory(call, SPEC, 4, 2, 1, 1, _vllm(kv_cache_bytes=4 << 30, release=False))
    engine = kept.engine + kept.kv_cache
    # released, the plan fits; kept, the engine crowds the actor's training out
    assert plans[True].feasible and not plans[False].feasible
    assert plans[False].reason is not None and plans[False].reason.startswith("actor_train")
    for c in ("ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train"):
        assert plans[False].peak_mem[c] == pytest.approx(plans[True].peak_mem[c] + engine), c
    assert plans[False].peak_mem["actor_gen"] == pytest.approx(plans[True].peak_mem["actor_gen"])


def test_plan_command_shows_and_writes_the_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lightning_real.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {"actor": "llama2-7b"},
                "batch_size": 64,
                "gen_len": 896,
                "features": {"vllm": {"kv_cache_bytes": 32 << 30, "enforce_eager": False}},
            }
        )
    )
    out = tmp_path / "out"
    args = ["plan", str(recipe), "--gpu", "h200", "--steps", "300", "--no-progress", "--out", str(out)]
    assert main([*args, "--generation-backend", "vllm"]) == 0
    text = capsys.readouterr().out
    assert "vllm generation" in text and "engine" in text
    row = next(line for line in text.splitlines() if line.startswith("actor_gen"))
    assert " vllm " in row
    doc = yaml.safe_load((out / "plan.yaml").read_text())
    assert doc["backends"] == {"actor_gen": "vllm"}
    assert doc["features"]["generation_backend"] == "vllm"
    plan = Plan.from_yaml(out / "plan.yaml")
    assert Layout.parse(str(plan.layouts["actor_gen"])).pp == 1
    assert main([*args, "--generation-backend", "native"]) == 0
    text = capsys.readouterr().out
    row = next(line for line in text.splitlines() if line.startswith("actor_gen"))
    assert " native " in row
    assert "backends" not in yaml.safe_load((out / "plan.yaml").read_text())
