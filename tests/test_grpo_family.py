"""GRPO's family on 4 CPU processes (gloo), tiny random llama: RLOO, REINFORCE++ (one sample per
prompt) and its group-baseline variant, GSPO with truncated importance sampling, DAPO (dynamic
sampling with a verifiable reward, overlong shaping, clip-higher), Dr. GRPO and GRPO pass@k with
dual clip.

For each, one iteration under a plan that moves the actor between layouts leaves the same actor
weights as under the symmetric plan, the same samples are scored, and the algorithm's metrics
are there and finite. The runtime is built and run here as RealStrategy builds and runs it
(one world for every case, so the processes start once).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_real.distributed.launch import spawn

GEN_LEN = 6
PLAN = {
    "actor_gen": "d4t1p1",
    "ref_inf": "d2t1p1@2-3",
    "rew_inf": "d2t1p1@0-1",
    "actor_inf": "d2t2p1",
    "actor_train": "d1t2p2",
}
"""The moving plan, restricted to each case's calls (the actor trains on d1t2p2, samples on 4
replicas, scores its samples on d2t2p1)."""
CASES: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    # name: (prompts per iteration, GRPOConfig overrides of the preset, plan overrides)
    "rloo": (4, {"group_size": 4, "kl_coef": 0.01}, {}),
    "reinforce_pp": (8, {}, {}),
    "reinforce_pp_baseline": (4, {"group_size": 4}, {}),
    "gspo": (4, {"group_size": 4, "tis_cap": 2.0}, {}),
    "dapo": (4, {"group_size": 2, "max_gen_rounds": 3, "overlong_buffer": 2}, {"actor_gen": "d2t2p1"}),
    "dr_grpo": (4, {"group_size": 4}, {}),
    "grpo": (4, {"group_size": 4, "adv_estimator": "grpo_passk", "dual_clip": 3.0, "kl_coef": 0.01}, {}),
}
KEYS: dict[str, tuple[str, ...]] = {
    "rloo": ("actor/kl_loss", "reward/group_std"),
    "reinforce_pp": ("actor/ref_kl",),
    "reinforce_pp_baseline": ("actor/ref_kl", "reward/group_std"),
    "gspo": ("actor/tis_weight_mean", "actor/tis_clipfrac", "actor/rollout_kl"),
    "dapo": ("dapo/gen_rounds", "dapo/kept_groups", "dapo/kept_frac", "reward/overlong_penalty"),
    "dr_grpo": ("reward/group_std",),
    "grpo": ("actor/pg_clipfrac_lower", "actor/kl_loss"),
}
"""Metrics each case reports besides the common ones."""
COMMON = ("reward/mean", "actor/pg_loss", "actor/pg_clipfrac", "actor/grad_norm", "actor/entropy")


def parity_truth(prompt: str, response: str, ground_truth: str) -> float:
    """A binary verifiable reward: 1 when the response's length has the parity the row's ground
    truth names (so about half the groups of two have equal scores and dynamic sampling drops them)."""
    return float(len(response) % 2 == int(ground_truth))


def _module(name: str) -> Any:
    from lightning_real.algorithms.grpo import GRPOConfig
    from lightning_real.data.verifiable import VerifiableReward
    from lightning_real.models.generate import GenerationConfig
    from lightning_real.models.optim import OptimConfig
    from lightning_real.models.spec import tiny_spec
    from lightning_real.modules.grpo import GRPOModule

    prompts, overrides, _ = CASES[name]
    reward = None
    if name == "dapo":
        reward = VerifiableReward(parity_truth, [str(i % 3 % 2) for i in range(64)])
    return GRPOModule(
        tiny_spec("llama"),
        reward,
        batch_size=prompts,
        generation=GenerationConfig(max_new_tokens=GEN_LEN),
        grpo=GRPOConfig.preset(name, **overrides),
        # eps 1e-6: AdamW's first step would turn the rounding noise of near-zero gradients into
        # lr-sized moves (the layouts sum in different orders)
        actor_optim=OptimConfig(lr=3e-3, eps=1e-6),
    )


def _batch(rows: int) -> dict[str, torch.Tensor]:
    from lightning_real.data.collate import collate_prompts
    from lightning_real.data.datasets import PromptDataset, TextLimits
    from lightning_real.data.task import asset
    from lightning_real.data.tokenizer import byte_tokenizer

    tok = byte_tokenizer()
    ds = PromptDataset(asset("prompts"), tok, TextLimits(max_prompt_len=24))
    return collate_prompts([ds[i] for i in range(rows)], tok.pad_token_id)


def _iteration(module: Any, plan_arg: Any, rank: int, world: int) -> tuple[dict[str, float], Any, int]:
    """One iteration as RealStrategy runs it: metrics, the actor's weights (on one rank), bytes moved."""
    import torch.distributed as dist

    from lightning_real.distributed.groups import GroupRegistry
    from lightning_real.models.hf import gather_canonical
    from lightning_real.plans import resolve_plan
    from lightning_real.runtime.build import RuntimeConfig, build_runtime
    from lightning_real.runtime.executor import Executor, reduce_metrics

    graph = module.real_graph()
    plan = resolve_plan(plan_arg, graph, world, module.real_specs())
    registry = GroupRegistry(backend="gloo")
    calls = graph.topological_order()
    for call in calls:
        registry.for_layout(plan.layouts[call.name])
    ctx = build_runtime(graph, module.real_roles(), plan, registry, RuntimeConfig(world))
    fns = module.real_setup(ctx)
    ex = Executor(
        calls,
        dict(plan.layouts),
        fns,
        ctx.pool.move,
        rank,
        release=ctx.pool.release,
        data_group=dist.group.WORLD,
    )
    module.iteration = 0
    result = ex.run(module.make_source(_batch(module.prompts_per_step)))
    metrics = reduce_metrics(result.metrics)
    weights = gather_canonical(ctx.pool.models["actor"].home)
    moved = [0] * world
    dist.all_gather_object(moved, ctx.pool.bytes_moved)
    return metrics, weights, sum(moved)


def _world(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        for label in ("symmetric", "moving"):
            module = _module(name)
            calls = module.real_graph().names
            plan: Any = "symmetric"
            if label == "moving":
                plan = {c: lay for c, lay in {**PLAN, **CASES[name][2]}.items() if c in calls}
            out[f"{name}/{label}"] = (*_iteration(module, plan, rank, world), calls)
    return out


@pytest.fixture(scope="module")
def runs() -> dict[str, Any]:
    per_rank = spawn(_world, 4, list(CASES), timeout_s=900)
    merged: dict[str, Any] = {}
    for key in per_rank[0]:
        metrics, _, moved, calls = per_rank[0][key]
        weights = next(r[key][1] for r in per_rank if r[key][1] is not None)
        merged[key] = (metrics, weights, moved, calls)
    return merged


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", list(CASES))
def test_moving_plan_equals_the_symmetric_plan(runs: dict[str, Any], name: str) -> None:
    sym_m, sym_w, sym_moved, calls = runs[f"{name}/symmetric"]
    real_m, real_w, real_moved, _ = runs[f"{name}/moving"]
    assert sym_moved == 0 and real_moved > 0  # the actor moved to sample (and to score under TIS)
    assert set(sym_w) == set(real_w)
    for k in sym_w:
        # fp32, one AdamW step of lr 3e-3: the layouts differ only by summation order
        torch.testing.assert_close(real_w[k], sym_w[k], atol=2e-5, rtol=0, msg=k)
    for m in (sym_m, real_m):
        for k in (*COMMON, *KEYS[name]):
            assert k in m and math.isfinite(m[k]), (k, sorted(m))
    # the same samples were scored under both plans
    assert real_m["reward/mean"] == pytest.approx(sym_m["reward/mean"], abs=1e-6)
    if name == "gspo":
        assert "actor_inf" in calls
        # the native engine is both the rollout engine and the trainer: every ratio is 1
        assert sym_m["actor/tis_weight_mean"] == pytest.approx(1.0, abs=1e-4)
        assert sym_m["actor/tis_clipfrac"] == 0.0
        assert abs(sym_m["actor/rollout_kl"]) < 1e-4
    if name == "dapo":
        assert "rew_inf" not in calls  # the reward runs inside actor_gen, round by round
        assert real_m["dapo/kept_groups"] == sym_m["dapo/kept_groups"]
        assert real_m["dapo/gen_rounds"] == sym_m["dapo/gen_rounds"] >= 1
    if name == "reinforce_pp":
        assert "reward/group_std" not in sym_m  # one sample per prompt: no groups
