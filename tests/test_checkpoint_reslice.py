"""Models and optimizer states through canonical coordinates, on 4 real gloo processes.

After two training steps under a layout, every rank's saved ``(parameters, engine state)`` is
reassembled into canonical tensors (:func:`~lightning_real.resume.canonical.assemble`) and
sliced back (:func:`~lightning_real.resume.canonical.load_canonical`) into a freshly built
shard and engine: under the same layout the parameters, Adam moments, step counts and fp32
master weights must come back bit-identical (only copies happen), ZeRO-1 slices included; under
another layout the canonical state reassembled from it must equal the first one bit for bit.
Mismatched models are refused with an error naming what differs.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.distributed as dist

from lightning_real.checkpoint.folders import CheckpointError
from lightning_real.distributed.groups import GroupRegistry
from lightning_real.distributed.launch import spawn
from lightning_real.layout import Layout
from lightning_real.models.build import BuildOptions
from lightning_real.models.optim import OptimConfig
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import ModelSpec, tiny_spec
from lightning_real.models.train import TrainConfig, TrainEngine, split_for_dp
from lightning_real.models.vocab_parallel import vocab_parallel_logprobs
from lightning_real.resume.canonical import CanonicalState, assemble, load_canonical
from lightning_real.resume.roles import check_roles, role_specs

WORLD = 4
B, S = 8, 10
OPT = OptimConfig(lr=3e-3, eps=1e-6, weight_decay=0.1, max_grad_norm=0.5, warmup_steps=1)

# (name, model, precision, layout A (trained, saved, reloaded), layout B (resliced onto))
CASES: list[tuple[str, str, str, str, str]] = [
    ("zero_d2t2", "llama", "32-true", "d2t2p1", "d1t2p2"),
    ("bf16_d2p2", "gpt2", "bf16-mixed", "d2t1p2", "d4t1p1"),  # tied copy on the last stage
]


def _spec(model: str) -> ModelSpec:
    return tiny_spec(model)  # type: ignore[arg-type]


def _batch(spec: ModelSpec) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, spec.vocab_size, (B, S), generator=gen)
    return {"input_ids": ids, "loss_mask": torch.ones(B, S - 1)}


def _loss(tp: Any, out: torch.Tensor, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    lp = vocab_parallel_logprobs(out[:, :-1].float(), mb["input_ids"][:, 1:], tp)
    return -(lp * mb["loss_mask"]).sum(), {}


def _engine(spec: ModelSpec, reg: GroupRegistry, layout: str, precision: str, canonical: Any) -> TrainEngine:
    groups = reg.for_layout(Layout.parse(layout).resolve(WORLD))
    dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    shard = ModelShard.from_canonical(spec, groups, canonical, BuildOptions(dtype=dtype))
    cfg = TrainConfig(n_mbs=2, optim=OPT, precision=precision, distributed_optimizer=True)  # type: ignore[arg-type]
    return TrainEngine(shard, functools.partial(_loss, groups.tp), cfg)


def _saved(engine: TrainEngine) -> list[Any]:
    """Every rank's ``(parameters by local name, engine state)``, as a checkpoint holds them."""
    mine = ({ps.local_name: p.detach().clone() for ps, p in engine.shard.params()}, engine.state_dict())
    every: list[Any] = [None] * WORLD
    dist.all_gather_object(every, mine)
    return every


def _flat(state: CanonicalState) -> dict[str, torch.Tensor]:
    out = {f"param/{k}": v for k, v in state.params.items()}
    for name, tensors in state.states.items():
        out.update({f"{name}/{k}": v for k, v in tensors.items()})
    if state.step is not None:
        out["step"] = state.step
    return out


def _identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors differ in keys, dtype or any bit."""
    if set(a) != set(b):
        return sorted(set(a) ^ set(b))
    return [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]


def _own_state(engine: TrainEngine) -> dict[str, torch.Tensor]:
    """This rank's parameters, Adam states and master copy, flattened to named tensors."""
    out = {f"param/{ps.local_name}": p.detach().clone() for ps, p in engine.shard.params()}
    if engine.sharded is None:
        return out
    sd = engine.state_dict()
    for index, st in sd["optimizer"]["state"].items():
        out.update({f"{k}/{index}": v for k, v in st.items()})
    if "master" in sd:
        out["master"] = sd["master"]
    return out


def _world(rank: int, world: int) -> dict[str, Any]:
    reg = GroupRegistry()
    reg.build([Layout.parse(lay).resolve(world) for case in CASES for lay in case[3:]])
    out: dict[str, Any] = {}
    for name, model, precision, a, b in CASES:
        spec = _spec(model)
        first = _engine(spec, reg, a, precision, random_canonical(spec, seed=3))
        local = split_for_dp(_batch(spec), first.shard.layout.dp, first.shard.groups.dp_rank)
        for _ in range(2):
            first.step(local)
        canonical = assemble(spec, "actor", _saved(first), "test")
        other = random_canonical(spec, seed=9)  # a different start: everything must be overwritten
        again = _engine(spec, reg, a, precision, other)
        load_canonical(again, canonical)
        moved = _engine(spec, reg, b, precision, other)
        load_canonical(moved, canonical)
        back = assemble(spec, "actor", _saved(moved), "test")
        out[name] = {
            "same_layout": _identical(_own_state(first), _own_state(again)),
            "steps": (first.steps, again.steps, moved.steps),
            "via_other_layout": _identical(_flat(canonical), _flat(back)),
            "states": sorted(canonical.states),
            "zero1_slices": bool(first.distributed),
        }
        dist.barrier()
    return out


@functools.cache
def _results() -> list[dict[str, Any]]:
    return spawn(_world, WORLD, timeout_s=300)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_optimizer_state_through_canonical_coordinates_is_bit_identical(name: str) -> None:
    results = [r[name] for r in _results()]
    expected = ["exp_avg", "exp_avg_sq"] + (["master"] if "bf16" in name else [])
    for r in results:
        assert r["same_layout"] == []  # A -> canonical -> A: every tensor, every bit
        assert r["via_other_layout"] == []  # A -> canonical -> B -> canonical
        assert r["steps"] == (2, 2, 2)
        assert r["states"] == expected
    assert any(r["zero1_slices"] for r in results)


def test_a_different_model_or_a_missing_role_is_named(tmp_path) -> None:
    spec = tiny_spec("llama")
    saved = role_specs({"actor": spec})
    check_roles(tmp_path, saved, {"actor": spec})
    check_roles(tmp_path, None, {"actor": spec})  # written before roles were recorded
    wider = tiny_spec("llama", hidden_size=2 * spec.hidden_size)
    with pytest.raises(CheckpointError, match=r"role 'actor' was saved as a different model: hidden_size"):
        check_roles(tmp_path, saved, {"actor": wider})
    with pytest.raises(CheckpointError, match=r"no state for role 'critic'"):
        check_roles(tmp_path, saved, {"actor": spec, "critic": tiny_spec("llama", "value")})
    with pytest.raises(CheckpointError, match=r"role 'actor', which this run does not train"):
        check_roles(tmp_path, saved, {})
