"""engine.generation_backend=vllm without vLLM's engine: the errors that name the option, and
which tensors the direct weight path serves.

The engine itself is tested in ``tests/with_vllm`` (its own venv, ``.venv-vllm``).
"""

from __future__ import annotations

import sys

import pytest

from lightning_real.features import FeatureError, RuntimeFeatures
from lightning_real.layout import Layout
from lightning_real.models.sharding import WORD_EMBEDDINGS, ParamSpec, stage_param_specs
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.runtime.build import check_features, check_plan_backends
from lightning_real.runtime.generation import make_generator
from lightning_real.runtime.vllm_engine import VllmUnavailable
from lightning_real.runtime.vllm_generation import check_vllm_layout
from lightning_real.runtime.vllm_weights import direct_serves, vllm_vocab_rows


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(VllmUnavailable, match=r"engine\.generation_backend=vllm.*lightning-real\[vllm\]"):
        make_generator("vllm")


def test_the_runtime_takes_the_backend() -> None:
    check_features(RuntimeFeatures(generation_backend="vllm"))
    with pytest.raises(FeatureError, match="allowed: native, vllm"):
        RuntimeFeatures(generation_backend="sglang")  # type: ignore[arg-type]


def test_layouts_it_cannot_run_are_refused() -> None:
    with pytest.raises(VllmUnavailable, match=r"'actor_gen' runs on d1t1p2@0-1 \(tp=1, pp=2\).*dNtTp1"):
        check_vllm_layout(Layout.parse("d1t1p2@0-1"), 2, "actor_gen")
    with pytest.raises(VllmUnavailable, match=r"tp=2, pp=2"):
        check_vllm_layout(Layout.parse("d1t2p2@0-3"), 4, "actor_gen")
    with pytest.raises(VllmUnavailable, match=r"2 of the 4 ranks"):
        check_vllm_layout(Layout.parse("d2t1p1@0-1"), 4, "actor_gen")
    # what it runs: one engine per rank, or a tensor-parallel engine per replica
    check_vllm_layout(Layout.parse("d4t1p1@0-3"), 4, "actor_gen")
    check_vllm_layout(Layout.parse("d1t2p1@0-1"), 2, "actor_gen")
    check_vllm_layout(Layout.parse("d2t2p1@0-3"), 4, "actor_gen")


def _vocab(spec: ModelSpec) -> ParamSpec:
    (ps,) = [p for p in stage_param_specs(spec, 1, 0) if p.key == WORD_EMBEDDINGS]
    return ps


def test_the_direct_path_serves_a_vocabulary_only_where_vllm_splits_it_alike() -> None:
    # vLLM pads the vocabulary to a multiple of 64 and splits it evenly over tp ranks
    def vllm_rows(vocab: int, tp: int) -> int:
        return -(-vocab // 64) * 64 // tp

    # 256 rows: megatron 128 + 128, vLLM 128 + 128
    assert direct_serves(_vocab(tiny_spec(vocab_size=256)), 2, vllm_rows(256, 2))
    # 272 rows: megatron 136 + 136, vLLM 160 + 112: rank 0 would read rows rank 1 holds
    assert not direct_serves(_vocab(tiny_spec()), 2, vllm_rows(272, 2))
    # megatron padded to 128 x 2: 256 + 16 rows against vLLM's 160 + 112
    assert not direct_serves(_vocab(tiny_spec(pad_vocab_to_multiple_of=128)), 2, vllm_rows(272, 2))
    # megatron padded to 80 x 2: 160 + 112, as vLLM
    assert direct_serves(_vocab(tiny_spec(pad_vocab_to_multiple_of=80)), 2, vllm_rows(272, 2))
    # no vocabulary layer of that name in the engine: gathered; tp=1 always direct
    assert not direct_serves(_vocab(tiny_spec(vocab_size=256)), 2, None)
    assert direct_serves(_vocab(tiny_spec()), 1, None)
    # linear layers split alike in both (heads, ffn, input columns): always direct
    qkv = next(p for p in stage_param_specs(tiny_spec(), 1, 0) if p.key.endswith("linear_qkv.weight"))
    assert direct_serves(qkv, 2, None)
    assert vllm_vocab_rows(160, 272, 1) == (160, 272) and vllm_vocab_rows(160, 272, 2) == (272, 272)


def test_recipe_keys_set_the_engine_and_name_the_key_at_fault() -> None:
    from lightning_real.recipes.errors import RecipeError
    from lightning_real.recipes.load import load_recipe

    recipe = "recipes/tiny/ppo.yaml"
    r = load_recipe(
        recipe, ["engine.vllm.max_num_seqs=8", "engine.vllm.kv_cache_bytes=4096", "engine.vllm.release=false"]
    )
    assert (r.engine.vllm.max_num_seqs, r.engine.vllm.kv_cache_bytes, r.engine.vllm.release) == (
        8,
        4096,
        False,
    )
    with pytest.raises(RecipeError, match=r"'engine\.vllm\.max_num_seqs': 0 .*allowed: an integer >= 1"):
        load_recipe(recipe, ["engine.vllm.max_num_seqs=0"])
    with pytest.raises(RecipeError, match=r"unknown key 'engine\.vllm\.kv_cache'.*kv_cache_bytes"):
        load_recipe(recipe, ["engine.vllm.kv_cache=1"])
    # a plan file or report gives the engine's settings as a mapping
    f = RuntimeFeatures(**{**RuntimeFeatures().to_dict(), "vllm": {"max_num_seqs": 3}})
    assert f.vllm.max_num_seqs == 3 and f.vllm.kv_cache_bytes == RuntimeFeatures().vllm.kv_cache_bytes


def test_auto_leaves_each_generate_call_to_the_plan() -> None:
    from lightning_real.graphs.ppo import ppo_graph
    from lightning_real.plans import Plan, PlanError, check_plan, symmetric

    auto = RuntimeFeatures(generation_backend="auto")
    assert auto.for_call("actor", "generate", backend="vllm").generation_backend == "vllm"
    assert auto.for_call("actor", "generate").generation_backend == "native"  # no choice: native
    # fixed features ignore the plan's (absent) choice
    assert (
        RuntimeFeatures(generation_backend="vllm").for_call("actor", "generate").generation_backend == "vllm"
    )
    with pytest.raises(FeatureError, match="allowed: native, vllm"):
        auto.for_call("actor", "generate", backend="sglang")
    plan = Plan({"actor_gen": "d2t1p1@0-1", "actor_train": "d2t1p1@0-1"}, backends={"actor_gen": "vllm"})
    assert Plan.from_dict(plan.to_dict()) == plan and plan.to_dict()["backends"] == {"actor_gen": "vllm"}
    with pytest.raises(PlanError, match="backend of actor_gen = 'tgi'; allowed: native, vllm"):
        Plan({"actor_gen": "d2t1p1@0-1"}, backends={"actor_gen": "tgi"})
    with pytest.raises(PlanError, match="backends names 'critic_gen', which has no layout"):
        Plan({"actor_gen": "d2t1p1@0-1"}, backends={"critic_gen": "vllm"})
    graph = ppo_graph(8)
    sym = symmetric(graph, 2)
    assert check_plan(Plan(sym.layouts, backends={"actor_gen": "vllm"}), graph, 2).backends == {
        "actor_gen": "vllm"
    }
    with pytest.raises(PlanError, match="backends names actor_train, which is not a generate call"):
        check_plan(Plan(sym.layouts, backends={"actor_train": "vllm"}), graph, 2)
    check_plan_backends(auto, plan)
    check_plan_backends(RuntimeFeatures(generation_backend="vllm"), plan)
    with pytest.raises(
        FeatureError,
        match=r"engine\.generation_backend is 'native'; allowed: engine\.generation_backend=auto",
    ):
        check_plan_backends(RuntimeFeatures(), plan)
