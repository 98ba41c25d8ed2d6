"""Dataflow graphs: key matching, order, levels, the algorithms' graphs and their errors."""

from __future__ import annotations

import pytest

from lightning_real.dataflow import MFC, DataflowGraph, GraphError
from lightning_real.graphs import dpo_graph, grpo_graph, ppo_graph, remax_graph, rw_graph, sft_graph


def _call(
    name: str, ins: tuple[str, ...], outs: tuple[str, ...], role: str = "actor", kind: str = "inference"
):
    return MFC(name, role, kind, ins, outs, batch_size=4)  # type: ignore[arg-type]


def test_ppo_graph_structure():
    g = ppo_graph(batch_size=16, n_mbs={"actor_train": 4}, minibatches=2)
    assert g.names[0] == "actor_gen"
    assert g.levels() == [
        ("actor_gen",),
        ("ref_inf", "rew_inf", "critic_inf"),
        ("actor_train", "critic_train"),
    ]
    assert g.producer("values") == "critic_inf"
    assert g.producer("prompts") is None
    assert g.consumers("seq") == ("ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train")
    assert set(g.parents("actor_train")) == {"actor_gen", "ref_inf", "rew_inf", "critic_inf"}
    assert g.children("actor_gen") == ("ref_inf", "rew_inf", "critic_inf", "actor_train", "critic_train")
    assert g.call("actor_train").n_mbs == 4 and g.call("critic_train").n_mbs == 1
    assert g.call("actor_train").minibatches == 2
    assert g.roles() == ("actor", "ref", "reward", "critic")
    # every call comes after its parents
    pos = {n: i for i, n in enumerate(g.names)}
    assert all(pos[p] < pos[c.name] for c in g for p in c.deps)


def test_topological_order_is_independent_of_input_order():
    calls = [
        _call("train", ("seq", "a"), (), kind="train"),
        _call("left", ("seq",), ("a",), role="ref"),
        _call("gen", ("prompts",), ("seq",), kind="generate"),
    ]
    g = DataflowGraph(calls)
    assert g.names == ("gen", "left", "train")
    assert [g.level(n) for n in g.names] == [0, 1, 2]
    assert g.call("train").deps == ("gen", "left")


def test_explicit_deps_order_calls_without_data():
    calls = [_call("a", ("prompts",), ("x",)), _call("b", ("prompts",), ("y",), role="ref")]
    g = DataflowGraph([calls[0], MFC("b", "ref", "inference", ("prompts",), ("y",), 4, deps=("a",))])
    assert g.levels() == [("a",), ("b",)]


def test_cycle_is_an_error_naming_calls_and_keys():
    calls = [
        _call("gen", ("prompts",), ("seq",), kind="generate"),
        _call("a", ("seq", "y"), ("x",), role="ref"),
        _call("b", ("x",), ("y",), role="critic"),
    ]
    with pytest.raises(GraphError, match=r"cycle: a -\(x\)-> b -\(y\)-> a"):
        DataflowGraph(calls)


def test_missing_producer_is_an_error_naming_call_and_key():
    calls = [
        _call("gen", ("prompts",), ("seq",), kind="generate"),
        _call("ref_inf", ("seqs",), ("r",), "ref"),
    ]
    with pytest.raises(
        GraphError, match=r"call ref_inf reads key 'seqs', which no call writes.*sources: prompts"
    ):
        DataflowGraph(calls)


def test_two_producers_and_source_writers_are_errors():
    with pytest.raises(GraphError, match=r"key 'seq' is written by two calls: a and b"):
        DataflowGraph([_call("a", ("prompts",), ("seq",)), _call("b", ("prompts",), ("seq",), "ref")])
    with pytest.raises(GraphError, match=r"call a writes key 'prompts', which is a source key"):
        DataflowGraph([_call("a", ("prompts",), ("prompts",))])
    with pytest.raises(GraphError, match=r"call names \['a'\] appear more than once"):
        DataflowGraph([_call("a", ("prompts",), ("x",)), _call("a", ("prompts",), ("y",))])
    with pytest.raises(GraphError, match=r"depends on 'zz'"):
        DataflowGraph([MFC("a", "actor", "inference", ("prompts",), ("x",), 4, deps=("zz",))])


def test_bad_call_fields_name_option_and_allowed_values():
    with pytest.raises(GraphError, match=r"role='policy'; allowed: actor, critic, reward, ref"):
        MFC("a", "policy", "inference", ("prompts",), ("x",), 4)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"call_type='eval'; allowed: generate, inference, train"):
        MFC("a", "actor", "eval", ("prompts",), ("x",), 4)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"batch_size=0; allowed: an integer >= 1"):
        MFC("a", "actor", "inference", ("prompts",), ("x",), 0)
    with pytest.raises(GraphError, match=r"a train call has no output keys"):
        MFC("a", "actor", "train", ("prompts",), ("x",), 4)
    with pytest.raises(GraphError, match=r"input_keys='prompts'"):
        MFC("a", "actor", "inference", "prompts", ("x",), 4)  # type: ignore[arg-type]
    with pytest.raises(GraphError, match=r"n_mbs names unknown calls \['actor_trian'\]"):
        ppo_graph(8, n_mbs={"actor_trian": 2})


def test_other_algorithm_graphs():
    g = grpo_graph(batch_size=32, group_size=4)
    assert "critic_inf" not in g and "critic_train" not in g
    assert g.call("actor_gen").input_rows == 8 and g.call("actor_train").input_rows == 32
    assert "ref_inf" not in grpo_graph(32, 4, use_ref=False)
    r = remax_graph(8)
    assert r.call("actor_gen_greedy").greedy and r.producer("greedy_rewards") == "rew_inf_greedy"
    assert set(r.parents("actor_train")) == {"actor_gen", "ref_inf", "rew_inf", "rew_inf_greedy"}
    d = dpo_graph(8)
    assert d.levels() == [("ref_inf",), ("actor_train",)]
    assert sft_graph(8).names == ("actor_train",) and rw_graph(8).call("rew_train").role == "reward"


def test_renderings_list_every_call_and_edge():
    g = ppo_graph(8)
    text = g.to_text()
    assert "L1 critic_inf [critic inference, 8 seqs, 1 mbs]: seq, attention_mask -> values" in text
    dot = g.to_dot()
    assert dot.startswith('digraph "ppo"') and dot.rstrip().endswith("}")
    assert '"critic_inf" -> "actor_train" [label="values"];' in dot
    assert '"<source>" -> "actor_gen" [label="prompts, prompt_mask"];' in dot
    # data -> gen, gen -> 3 inferences, 4 producers -> each of 2 trainings
    assert dot.count("->") == len(g.edges()) == 1 + 3 + 2 * 4


def test_planner_reads_the_graph():
    from lightning_real.models.spec import tiny_spec
    from lightning_real.planner.workload import workload_from_graph

    g = ppo_graph(8, prompt_len=16, gen_len=8)
    specs = {r: tiny_spec(head="value" if r in ("critic", "reward") else "lm") for r in g.roles()}
    w = workload_from_graph(g, specs)
    assert w.names == g.names
    assert set(w.call("critic_train").deps) == {"actor_gen", "ref_inf", "rew_inf", "critic_inf"}
