"""Plans: reading, named plans, validation errors, and a resolved plan driving the runtime on 4 ranks."""

from __future__ import annotations

import pytest
import torch

from lightning_real.distributed.launch import spawn
from lightning_real.graphs import grpo_graph, ppo_graph
from lightning_real.layout import Layout
from lightning_real.models.spec import tiny_spec
from lightning_real.plans import Plan, PlanError, check_plan, disjoint, resolve_plan, symmetric

HAND = {
    "actor_gen": "d4t1p2",
    "actor_train": "d2t2p1@0-3",
    "critic_train": "d2t2p1@4-7",
    "ref_inf": "d2t2p2",
    "rew_inf": "d2t2p1@0-3",
    "critic_inf": "d2t2p1@4-7",
}


def _specs() -> dict:
    lm, v = tiny_spec("llama"), tiny_spec("llama", "value")
    return {"actor": lm, "ref": lm, "critic": v, "reward": v}


def test_from_dict_and_yaml_forms(tmp_path):
    g = ppo_graph(16)
    p = resolve_plan(HAND, g, 8, _specs())
    assert p.layouts["actor_gen"] == Layout(4, 1, 2, tuple(range(8)))
    assert p.layouts["critic_train"].ranks == (4, 5, 6, 7)
    assert p.microbatches == dict.fromkeys(g.names, 1)
    # the flat mapping and the planner's {layouts, microbatches} form
    (tmp_path / "flat.yaml").write_text("\n".join(f"{k}: {v}" for k, v in HAND.items()))
    nested = Plan(HAND, {"actor_train": 2}).to_dict()
    Plan.from_dict(nested)  # round trip of the written form
    Plan(HAND, {"actor_train": 2}).to_yaml(tmp_path / "nested.yaml")
    flat = resolve_plan(str(tmp_path / "flat.yaml"), g, 8, _specs())
    assert flat.layouts == p.layouts and flat.name == "flat"
    nest = resolve_plan(tmp_path / "nested.yaml", g, 8, _specs())
    assert nest.microbatches["actor_train"] == 2 and nest.microbatches["ref_inf"] == 1


def test_named_plans():
    g = ppo_graph(16)
    s = resolve_plan("symmetric", g, 8, _specs())
    assert set(map(str, s.layouts.values())) == {"d8t1p1@0-7"}
    s2 = symmetric(g, 8, tp=2, pp=2)
    assert str(s2.layouts["actor_train"]) == "d2t2p2@0-7"
    d = disjoint(g, 8)
    assert {k: str(v) for k, v in d.layouts.items()} == {
        "actor_gen": "d4t1p1@0-3",
        "ref_inf": "d4t1p1@0-3",
        "rew_inf": "d4t1p1@4-7",
        "critic_inf": "d4t1p1@4-7",
        "actor_train": "d4t1p1@0-3",
        "critic_train": "d4t1p1@4-7",
    }
    with pytest.raises(PlanError, match="even world size"):
        disjoint(g, 3)
    with pytest.raises(PlanError, match="not divisible by tp\\*pp = 4\\*1"):
        symmetric(g, 6, tp=4)


def test_search_plan_comes_from_the_planner():
    g = ppo_graph(8, prompt_len=16, gen_len=8)
    from lightning_real.features import REFERENCE
    from lightning_real.planner.auto import search_plan

    p = resolve_plan(
        "search", g, 4, _specs(), search=lambda: search_plan(g, _specs(), REFERENCE, 4, steps=50)
    )
    assert p.name == "search" and set(p.layouts) == set(g.names)
    assert all(lay.ranks is not None and max(lay.ranks) < 4 for lay in p.layouts.values())


def test_plan_errors_name_the_problem():
    g = ppo_graph(16)
    with pytest.raises(
        PlanError, match=r"unknown plan 'fastest'; allowed: 'symmetric', 'disjoint', 'search'"
    ):
        resolve_plan("fastest", g, 8, _specs())
    with pytest.raises(PlanError, match=r"no layout for calls \['critic_inf'\]"):
        resolve_plan({k: v for k, v in HAND.items() if k != "critic_inf"}, g, 8, _specs())
    with pytest.raises(PlanError, match=r"names calls \['critic_gen'\] that the graph does not have"):
        resolve_plan({**HAND, "critic_gen": "d8"}, g, 8, _specs())
    with pytest.raises(PlanError, match=r"call actor_gen: layout d4t1p2: .*world size 4"):
        resolve_plan(HAND, g, 4, _specs())
    # tiny llama has 2 kv heads: tp=4 cannot split them
    with pytest.raises(
        PlanError, match=r"call ref_inf: layout d2t4p1: 2 key/value heads are not divisible by tp=4"
    ):
        resolve_plan({**HAND, "ref_inf": "d2t4p1"}, g, 8, _specs())
    with pytest.raises(PlanError, match=r"call actor_gen .* must both be divisible by dp=8"):
        resolve_plan("symmetric", ppo_graph(12), 8, _specs())
    with pytest.raises(PlanError, match=r"4 microbatches exceed the 2 sequences"):
        resolve_plan(Plan(HAND, {"critic_inf": 4}), ppo_graph(4), 8, _specs())
    with pytest.raises(PlanError, match=r"layout of actor_gen: .*expected degrees"):
        Plan({"actor_gen": "x4"})
    with pytest.raises(PlanError, match=r"microbatches of actor_gen = 0"):
        Plan({"actor_gen": "d2"}, {"actor_gen": 0})
    with pytest.raises(PlanError, match=r"no model spec for roles \['reward', 'critic'\]"):
        resolve_plan(HAND, g, 8, {"actor": tiny_spec(), "ref": tiny_spec()})
    with pytest.raises(PlanError, match="does not exist"):
        resolve_plan("missing-plan.yaml", g, 8)


def test_groups_stay_on_one_replica():
    g = grpo_graph(batch_size=16, group_size=4)
    # 16 sequences over dp=8 leave 2 per replica: a group of 4 would be split.
    with pytest.raises(PlanError, match=r"2 sequences per replica split groups of 4"):
        check_plan(Plan({**dict.fromkeys(g.names, "d8"), "actor_gen": "d4@0-3"}), g, 8)
    ok = check_plan(Plan({**dict.fromkeys(g.names, "d4t2p1"), "actor_gen": "d4@0-3"}), g, 8)
    assert ok.layouts["actor_gen"].ranks == (0, 1, 2, 3)


# ---- a resolved plan runs under the executor -------------------------------------------------
P, G, S = 4, 2, 6  # prompts, samples per prompt, sequence length


def _fns():
    def gen(shard, x):
        rows = x["prompts"].repeat_interleave(G, 0)
        b = rows.shape[0]
        seq = torch.cat([rows, rows + 100], 1)
        return {
            "seq": seq,
            "attention_mask": torch.ones_like(seq),
            "loss_mask": torch.ones_like(seq),
            "old_logp": -seq[:, 1:].float(),
            "no_eos": torch.zeros(b, dtype=torch.long),
        }, {}

    def ref(shard, x):
        return {"ref_logp": -x["seq"][:, 1:].float() + 1}, {}

    def rew(shard, x):
        return {"rewards": x["seq"][:, 0].float()}, {}

    def train(shard, x):
        ok = torch.equal(x["ref_logp"], x["old_logp"] + 1) and torch.equal(
            x["rewards"], x["seq"][:, 0].float()
        )
        return {}, {
            "rows_ok": float(ok),
            "rows": float(x["seq"].shape[0]),
            "first": float(x["rewards"].min()),
        }

    return {"actor_gen": gen, "ref_inf": ref, "rew_inf": rew, "actor_train": train}


def _run_grpo(rank: int, world: int):
    from lightning_real.runtime.executor import Executor, reduce_metrics

    g = grpo_graph(batch_size=P * G, group_size=G, prompt_len=3, gen_len=3)
    plan = resolve_plan("disjoint", g, world)
    ex = Executor(g.topological_order(), dict(plan.layouts), _fns(), lambda role, lay: (None, 0), rank)
    prompts = torch.arange(P * 3).reshape(P, 3)
    res = ex.run({"prompts": prompts, "prompt_mask": torch.ones_like(prompts)})
    return reduce_metrics(res.metrics), {k: str(v) for k, v in plan.layouts.items()}


def test_grpo_plan_runs_on_the_executor():
    metrics, layouts = spawn(_run_grpo, 4)[0]
    # disjoint: actor calls on ranks 0-1, reward on 2-3; sequences cross between the halves
    assert layouts["actor_gen"] == "d2t1p1@0-1" and layouts["rew_inf"] == "d2t1p1@2-3"
    assert metrics["rows_ok"] == 1.0
    assert metrics["rows"] == P * G / 2  # each of the 2 replicas trains on half of the 8 sequences
    # replica 0 got prompts 0-1 (first ids 0 and 3), replica 1 prompts 2-3 (6 and 9): mean of minima
    assert metrics["first"] == (0 + 6) / 2
