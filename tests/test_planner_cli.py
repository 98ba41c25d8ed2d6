"""``lightning-real plan``: presets, recipe YAML, outputs, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lightning_real.cli import main
from lightning_real.layout import Layout
from lightning_real.models.spec import tiny_spec
from lightning_real.planner.hardware import H100, load_profile, save_profile
from lightning_real.planner.presets import llama2_spec
from lightning_real.recipes.planning import workload_from_recipe


def test_plan_preset_prints_table_and_writes_outputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    rc = main(
        [
            "plan",
            "llama2-7b",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--gpu",
            "h100",
            "--steps",
            "300",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
            "--gen-len",
            "384",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    for word in (
        "actor_gen",
        "critic_train",
        "dp/tp/pp",
        "symmetric",
        "disjoint",
        "heuristic",
        "search speedup",
    ):
        assert word in text
    assert (out / "timeline.png").stat().st_size > 10_000
    assert b"<svg" in (out / "timeline.svg").read_bytes()[:500]
    doc = yaml.safe_load((out / "plan.yaml").read_text())
    assert set(doc["layouts"]) == {
        "actor_gen",
        "rew_inf",
        "ref_inf",
        "critic_inf",
        "actor_train",
        "critic_train",
    }
    for s in doc["layouts"].values():
        lay = Layout.parse(s)
        assert lay.ranks is not None and max(lay.ranks) < 8
    fitting = [t for t in doc["baselines_s"].values() if t is not None]
    assert doc["predicted_iteration_s"] <= min(fitting) + 1e-3


def test_unknown_gpu_lists_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="unknown --gpu 'b200'; allowed: a100, cpu-gloo, h100, h200, local"):
        main(["plan", "llama2-7b", "--gpu", "b200", "--out", str(tmp_path)])


def test_unknown_recipe_lists_presets() -> None:
    with pytest.raises(SystemExit, match="presets: llama2-7b, llama2-13b"):
        main(["plan", "gpt5", "--steps", "1", "--no-progress"])


def test_run_without_a_recipe_asks_for_one(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "give a recipe YAML" in capsys.readouterr().err


def test_recipe_yaml_with_sizes_and_hf_config(tmp_path: Path) -> None:
    critic_dir = tmp_path / "critic"
    critic_dir.mkdir()
    tiny = tiny_spec("qwen2")
    tiny.to_hf_config().to_json_file(str(critic_dir / "config.json"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "actor": "llama2-13b",
                    "critic": {"hf_config": "critic"},
                    "reward": {
                        "family": "llama",
                        "vocab_size": 1000,
                        "hidden_size": 128,
                        "num_layers": 2,
                        "num_heads": 4,
                        "num_kv_heads": 4,
                        "ffn_hidden_size": 256,
                    },
                },
                "data": {"batch_size": 64},
                "planner": {"gen_len": 256},
            }
        )
    )
    w = workload_from_recipe(str(recipe), prompt_len=64)
    assert w.spec("actor_gen") == llama2_spec("13b")
    assert w.spec("ref_inf") == llama2_spec("13b")
    critic = w.spec("critic_train")
    assert critic.family == "qwen2" and critic.head == "value" and critic.hidden_size == tiny.hidden_size
    assert w.spec("rew_inf").hidden_size == 128 and w.spec("rew_inf").head == "value"
    c = w.call("actor_train")
    assert (c.batch_size, c.prompt_len, c.gen_len) == (64, 64, 256)


def test_recipe_errors_name_the_option(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"models": {"actor": "llama2-8b"}}))
    with pytest.raises(ValueError, match=r"models.actor: unknown model 'llama2-8b'; allowed: llama2-7b"):
        workload_from_recipe(str(bad))
    bad.write_text(yaml.safe_dump({"models": {"actor": "7b", "judge": "7b"}}))
    with pytest.raises(
        ValueError, match="unknown model roles \\['judge'\\]; allowed: actor, critic, ref, reward"
    ):
        workload_from_recipe(str(bad))
    bad.write_text(yaml.safe_dump({"models": {"actor": "7b"}, "batch_size": 0}))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        workload_from_recipe(str(bad))


def test_profile_json_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "h.json"
    save_profile(H100, p)
    assert load_profile(p) == H100
    data = json.loads(p.read_text())
    data["warp_speed"] = 9
    p.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown fields \\['warp_speed'\\]"):
        load_profile(p)


def test_workload_from_a_dataflow_graph() -> None:
    from lightning_real.dataflow import MFC, DataflowGraph
    from lightning_real.planner.workload import workload_from_graph

    size = dict(batch_size=32, prompt_len=16, gen_len=8)
    graph = DataflowGraph(
        [
            MFC("actor_gen", "actor", "generate", ("prompts",), ("seq", "logp"), **size),
            MFC("ref_inf", "ref", "inference", ("seq",), ("ref_logp",), **size),
            MFC("critic_inf", "critic", "inference", ("seq",), ("values",), **size),
            MFC("actor_train", "actor", "train", ("seq", "logp", "ref_logp", "values"), (), **size),
        ]
    )
    actor = tiny_spec("llama")
    specs = {"actor": actor, "ref": actor, "critic": actor.with_head("value")}
    w = workload_from_graph(graph, specs)
    assert w.names == ("actor_gen", "ref_inf", "critic_inf", "actor_train")
    assert w.call("actor_train").deps == ("actor_gen", "ref_inf", "critic_inf")
    assert w.call("ref_inf").deps == ("actor_gen",)
    assert w.spec("critic_inf").head == "value" and w.call("actor_gen").seq_len == 24
    with pytest.raises(ValueError, match="no ModelSpec for role 'critic'"):
        workload_from_graph(graph, {"actor": actor, "ref": actor})


def test_runtime_resolves_plan_search_through_the_planner() -> None:
    # RealStrategy(plan="search") goes through lightning_real.plans.resolve_plan, which adapts the
    # dataflow graph with workload_from_graph and calls auto_plan; the plan must pass its checks.
    from lightning_real.features import REFERENCE
    from lightning_real.graphs import grpo_graph, ppo_graph
    from lightning_real.planner.auto import search_plan
    from lightning_real.plans import resolve_plan

    actor = tiny_spec("llama")
    specs = {
        "actor": actor,
        "ref": actor,
        "critic": actor.with_head("value"),
        "reward": actor.with_head("value"),
    }
    for graph in (
        ppo_graph(16, prompt_len=32, gen_len=32, minibatches=2),
        grpo_graph(16, 4, prompt_len=32, gen_len=32),
    ):
        used = {r: specs[r] for r in graph.roles()}
        plan = resolve_plan(
            "search",
            graph,
            4,
            used,
            search=lambda g=graph, s=used: search_plan(g, s, REFERENCE, 4, steps=200),
        )
        assert set(plan.layouts) == set(graph.names)
        for c in graph.calls:
            lay = plan.layouts[c.name]
            assert lay.ranks is not None and max(lay.ranks) < 4
            assert c.batch_size % lay.dp == 0 and (c.batch_size // c.group_size) % lay.dp == 0


def test_plan_reads_training_recipes_with_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_real.models.hf import save_tiny_hf
    from lightning_real.models.spec import tiny_spec
    from lightning_real.recipes.planning import workload_from_recipe

    root = Path(__file__).resolve().parents[1]
    tiny = workload_from_recipe(str(root / "recipes" / "tiny" / "ppo.yaml"))
    assert tiny.roles()["actor"] == tiny_spec("llama")
    assert tiny.roles()["reward"].head == "value"  # a rule reward, priced as the actor's size
    # the full recipe's ??? paths come from KEY=VALUE overrides, as for `lightning-real run`
    folder = save_tiny_hf(tiny_spec("qwen2"), tmp_path / "sft")
    full = root / "recipes" / "ppo.yaml"
    with pytest.raises(ValueError, match=r"actor\.path"):
        workload_from_recipe(str(full))
    w = workload_from_recipe(
        str(full), [f"actor.path={folder}", f"reward.path={folder}", "data.train=x.jsonl"]
    )
    assert w.roles()["actor"].family == "qwen2" and w.roles()["critic"].head == "value"
    # a relative model path means what it means to `lightning-real run`: from the working folder
    monkeypatch.chdir(tmp_path)
    rel = workload_from_recipe(str(full), ["actor.path=sft", "reward.path=sft", "data.train=x.jsonl"])
    assert rel.roles()["actor"] == w.roles()["actor"]
    assert (
        main(
            [
                "plan",
                str(full),
                f"actor.path={folder}",
                f"reward.path={folder}",
                "data.train=x.jsonl",
                "--steps",
                "50",
                "--no-progress",
                "--gpu",
                "cpu-gloo",
                "--gpus-per-node",
                "4",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    from lightning_real.plans import Plan

    written = Plan.from_yaml(tmp_path / "o" / "plan.yaml")  # a recipe's plan=plan-out/plan.yaml reads it
    assert set(written.layouts) == {
        "actor_gen",
        "ref_inf",
        "rew_inf",
        "critic_inf",
        "actor_train",
        "critic_train",
    }
    # every algorithm's recipe is priced through its own module's graph (SFT: one train call)
    sft = workload_from_recipe(str(root / "recipes" / "tiny" / "sft.yaml"))
    assert sft.names == ("actor_train",) and sft.spec("actor_train") == tiny_spec("llama")
