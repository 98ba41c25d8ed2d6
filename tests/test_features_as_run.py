"""Each shipped recipe is priced as it runs: the planner's workload is the runtime's own graph, and
the features it prices are the ones the runtime builds, read off the built objects.

For every recipe, ``lightning-real plan``'s workload (:func:`workload_from_recipe`) is compared
with what ``lightning-real run`` would build: the strategy that ``make_trainer`` configures
resolves its features, the runtime builds the recipe's models with them (in one gloo process,
on a one-device plan, tiny models in place of the recipe's checkpoints), and each built shard,
optimizer and generation engine is inspected (:func:`lightning_real.runtime.observe.observe`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_real.distributed.launch import spawn

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p for d in ("", "tiny", "quickstart") for p in (ROOT / "recipes" / d).glob("*.yaml"))


def _overrides(path: Path, folder: Path) -> list[str]:
    """Tiny stand-ins for the recipe's checkpoints and data (the recipe's other keys stay)."""
    import yaml

    raw = yaml.safe_load(path.read_text())
    out = [f"trainer.output_dir={folder / 'out'}", "trainer.accelerator=cpu"]
    for role in ("actor", "critic", "reward", "ref"):
        if isinstance(raw.get(role), dict) and "path" in raw[role]:
            head = "hf-value" if role in ("critic", "reward") else "hf"
            out.append(f"{role}.path={folder / head}")
    if isinstance(raw.get("reward"), dict) and raw["reward"].get("fn") == "???":
        # a verifiable reward scores prompt rows that carry their answers
        from lightning_real.data.arithmetic import write_arithmetic

        out.append("reward.fn=lightning_real.data.arithmetic:exact_match")
        out.append(f"data.train={write_arithmetic(folder / 'arithmetic')['train']}")
    elif raw.get("data", {}).get("train") == "???":
        out.append(f"data.train={ROOT / 'lightning_real' / 'data' / 'assets' / 'prompts.jsonl'}")
    if "tokenizer" in raw.get("data", {}):
        out.append("data.tokenizer=null")
    return out


def _built(rank: int, world: int, cases: list[tuple[str, list[str]]]) -> dict[str, Any]:
    from lightning_real.data.tokenizer import byte_tokenizer
    from lightning_real.distributed.groups import GroupRegistry
    from lightning_real.plans import check_plan, symmetric
    from lightning_real.recipes.launch import World
    from lightning_real.recipes.load import load_recipe
    from lightning_real.recipes.modules import make_module
    from lightning_real.recipes.planning import workload_from_recipe
    from lightning_real.recipes.trainer import make_trainer
    from lightning_real.runtime.build import RuntimeConfig, build_runtime
    from lightning_real.runtime.observe import observe

    results: dict[str, Any] = {}
    for path, over in cases:
        priced = workload_from_recipe(path, over)
        recipe = load_recipe(path, over)
        strategy = make_trainer(recipe, World(1, 1), "spawn").strategy
        features = strategy.resolve_features()  # type: ignore[attr-defined]
        module = make_module(recipe, byte_tokenizer())
        graph = module.real_graph()
        plan = check_plan(symmetric(graph, 1), graph, 1, module.real_specs())
        registry = GroupRegistry(backend="gloo")
        ctx = build_runtime(graph, module.real_roles(), plan, registry, RuntimeConfig(1, features))
        roles, generators = observe(ctx)
        results[path] = dict(
            priced=priced.features,
            priced_calls=priced.names,
            run_calls=graph.names,
            resolved=features,
            trained=set(graph.trained_roles()),
            roles=roles,
            generators=generators,
        )
    return results


@pytest.mark.timeout(600)
def test_every_shipped_recipe_is_priced_as_it_runs(tmp_path: Path) -> None:
    from lightning_real.models.hf import save_tiny_hf
    from lightning_real.models.spec import tiny_spec

    save_tiny_hf(tiny_spec("llama"), tmp_path / "hf")
    save_tiny_hf(tiny_spec("llama", head="value"), tmp_path / "hf-value")
    assert len(RECIPES) >= 15
    cases = [(str(p), _overrides(p, tmp_path)) for p in RECIPES]
    results = spawn(_built, 1, cases, timeout_s=600)[0]
    for path in map(str, RECIPES):
        r = results[path]
        f = r["priced"]
        # the planner prices the graph the runtime executes, with the features the strategy resolved
        assert r["priced_calls"] == r["run_calls"], path
        assert f == r["resolved"], path
        dtype = torch.float32 if f.param_bytes == 4 else torch.bfloat16
        for role, built in r["roles"].items():
            trained = role in r["trained"]
            assert built.dtype == dtype, (path, role)
            assert built.master_weights == (trained and f.master_bytes > 0), (path, role)
            # one device: a data-parallel group of 1 has nothing to split
            assert built.distributed_optimizer == (f.distributed_optimizer(1) if trained else None), (
                path,
                role,
            )
            assert built.attention == f.attention, (path, role)
            assert built.recompute == (f.recompute if trained else "none"), (path, role)
            assert built.grad_bucket_elems == (f.grad_bucket_elems if trained else None), (path, role)
        assert set(r["generators"].values()) <= {f.generation_backend}, path
        assert bool(r["generators"]) == any(c == "actor_gen" for c in r["run_calls"]), path
