"""A searched plan builds and runs on a real 4-process gloo world (the runtime's groups and models)."""

from __future__ import annotations

import torch

from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.sharding import param_specs
from lightning_real.models.spec import ModelSpec, check_layout, tiny_spec
from lightning_real.planner.hardware import CPU_GLOO, Cluster
from lightning_real.planner.search import SearchConfig, search
from lightning_real.planner.workload import ppo_workload


def _build_plan(
    rank: int, world: int, layouts: dict[str, str], specs: dict[str, ModelSpec]
) -> dict[str, object]:
    from lightning_real.distributed.groups import GroupRegistry
    from lightning_real.models.build import build_gpt

    reg = GroupRegistry()
    out: dict[str, object] = {}
    for name, text in layouts.items():
        lay = Layout.parse(text)
        groups = reg.for_layout(lay)
        if not groups.member:
            continue
        spec = specs[name]
        model = build_gpt(spec, groups, seed=0)
        expected = sum(int(torch.Size(p.local_shape(lay.tp)).numel()) for p in param_specs(spec, lay, rank))
        got = sum(p.numel() for p in model.parameters())
        shape = None
        if lay.pp == 1:
            ids = torch.arange(6).view(1, 6) % spec.vocab_size
            pos = torch.arange(6).view(1, 6)
            mask = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1).view(1, 1, 6, 6)
            with torch.no_grad():
                shape = tuple(model(ids, pos, mask).shape)
        out[name] = (got, expected, shape)
    return out


def test_searched_plan_builds_and_runs_on_a_real_4_process_world() -> None:
    actor = tiny_spec("llama")
    w = ppo_workload(actor, batch_size=16, prompt_len=32, gen_len=32)
    cluster = Cluster(1, 4, CPU_GLOO)
    r = search(w, cluster, SearchConfig(steps=300, seed=0))
    assert all(check_layout(w.spec(n), lay.resolve(4)) for n, lay in r.plan.layouts.items())
    specs = {c.name: w.spec(c) for c in w.calls}
    results = spawn(_build_plan, 4, r.plan.to_strings(), specs)
    for name, lay in r.plan.layouts.items():
        spec = specs[name]
        for rank in lay.ranks or ():
            got, expected, shape = results[rank][name]  # type: ignore[misc]
            assert got == expected, (name, rank)
            if shape is not None:
                out = spec.vocab_size // lay.tp if spec.head == "lm" else 1
                assert shape == (1, 6, out)
