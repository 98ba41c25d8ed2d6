"""A trained model's parameters and optimizer state in canonical coordinates, and back.

Every element a rank saves is a slice of a *canonical* tensor (tp=1, pp=1, global layer names:
:mod:`lightning_real.models.sharding`): its parameters by local name, under the layout and
coordinates its engine state records, and its AdamW state with what each tensor covers
(:meth:`~lightning_real.models.optim.ShardedAdamW.state_dict` ``pieces``: elements of a flattened
parameter, a 1/dp slice of them under ZeRO-1). :func:`assemble` rebuilds, from the saved states of
every rank, one :class:`CanonicalState` per role: canonical parameters, Adam moments
(``exp_avg``, ``exp_avg_sq``) and fp32 master weights, keyed by canonical name.
:func:`load_canonical` slices it into a rank's shard and optimizer under any layout (its ZeRO-1
slice included). Both only copy elements, so layout A -> canonical -> A is bit-identical, and
what a step computes next depends on the layout only through its order of summation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lightning_real.checkpoint.folders import CheckpointError
from lightning_real.layout import Layout
from lightning_real.models.optim import ADAM_MOMENTS
from lightning_real.models.sharding import ParamSpec, stage_param_specs
from lightning_real.models.spec import ModelSpec

if TYPE_CHECKING:
    from lightning_real.models.train import TrainEngine

MASTER = "master"
"""Name of the fp32 master weights among a :class:`CanonicalState`'s states."""

Saved = tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]
"""One rank's saved ``(parameters by local name, TrainEngine.state_dict())`` of one role."""


@dataclass
class CanonicalState:
    """One trained model, layout-independent."""

    params: dict[str, torch.Tensor]
    """Canonical parameters by canonical name."""
    states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """Optimizer states (``exp_avg``, ``exp_avg_sq``, ``master``) by canonical name; no moments
    before the first step, no master without master weights."""
    step: torch.Tensor | None = None
    """torch AdamW's per-tensor step count (None before the first step)."""
    steps: int = 0
    """Optimizer steps the engine took (the learning-rate schedule's position)."""


@dataclass
class _Local:
    """One parameter of one (stage, tp rank) being reassembled from the ranks' pieces."""

    spec: ParamSpec
    numel: int
    states: dict[str, torch.Tensor] = field(default_factory=dict)
    covered: dict[str, torch.Tensor] = field(default_factory=dict)

    def put(self, name: str, lo: int, hi: int, values: torch.Tensor) -> None:
        if name not in self.states:
            self.states[name] = torch.zeros(self.numel, dtype=values.dtype)
            self.covered[name] = torch.zeros(self.numel, dtype=torch.bool)
        self.states[name][lo:hi] = values.reshape(-1)
        self.covered[name][lo:hi] = True


def _stage_specs(
    spec: ModelSpec, role: str, layout: Layout, stage: int, names: Sequence[str], where: str
) -> list[ParamSpec]:
    specs = stage_param_specs(spec, layout.pp, stage)
    mine = [ps.local_name for ps in specs]
    if list(names) != mine:
        extra = sorted(set(names) - set(mine))[:3]
        missing = sorted(set(mine) - set(names))[:3]
        raise CheckpointError(
            f"{where}: role {role!r} was saved as a different model (stage {stage} of {layout}: "
            f"parameters {extra} not in this run's model, {missing} not in the checkpoint)"
        )
    return specs


def assemble(spec: ModelSpec, role: str, saved: Sequence[Saved], where: str) -> CanonicalState:
    """The canonical state of ``role`` from every rank's saved state (ranks outside its layout
    saved empty ones); a :class:`CheckpointError` naming what is missing or differs."""
    members = [(p, o) for p, o in saved if o]
    if not members:
        raise CheckpointError(f"{where}: no rank saved a state of role {role!r}")
    layout = Layout.parse(str(members[0][1]["layout"]))
    tp = layout.tp
    # canonical key -> stage -> tp rank -> local parameter (dp replica 0), and its spec per stage
    params: dict[str, dict[int, dict[int, torch.Tensor]]] = {}
    owners: dict[str, dict[int, ParamSpec]] = {}
    locals_: dict[tuple[int, int, str], _Local] = {}
    step: torch.Tensor | None = None
    steps = 0
    for local_params, optim in members:
        d, t, s = (int(c) for c in optim["coords"])
        specs = _stage_specs(spec, role, layout, s, optim["params"], where)
        steps = int(optim["steps"])
        for ps in specs:
            x = local_params.get(ps.local_name)
            if x is None or tuple(x.shape) != ps.local_shape(tp):
                got = None if x is None else tuple(x.shape)
                raise CheckpointError(
                    f"{where}: role {role!r}: {ps.local_name} on stage {s} of {layout} has shape {got}; "
                    f"this run's model needs {ps.local_shape(tp)} (a different model)"
                )
            owners.setdefault(ps.key, {})[s] = ps
            if d == 0:
                params.setdefault(ps.key, {}).setdefault(s, {})[t] = x
        if "pieces" not in optim:
            raise CheckpointError(
                f"{where}: the optimizer state of role {role!r} does not record its pieces; "
                "resume it under the plan and world size it was written with"
            )
        by_name = {ps.local_name: ps for ps in specs}
        torch_state = optim["optimizer"]["state"]
        master = optim.get(MASTER)
        offset = 0
        for name, lo, hi, index in optim["pieces"]:
            ps = by_name[name]
            acc = locals_.setdefault((s, t, name), _Local(ps, math.prod(ps.local_shape(tp))))
            st = torch_state.get(index)
            if st:
                for k in ADAM_MOMENTS:
                    acc.put(k, lo, hi, st[k])
                step = st["step"]
            if master is not None:
                acc.put(MASTER, lo, hi, master[offset : offset + hi - lo])
            offset += hi - lo
    out = CanonicalState(params={}, step=step, steps=steps)
    names = sorted({k for acc in locals_.values() for k in acc.states})
    for key, stages in owners.items():
        # The tied output copy on the last stage equals the embedding: the stage that owns it wins.
        stage = next((st for st, ps in stages.items() if ps.local_name == key), min(stages))
        ps = stages[stage]
        parts = params.get(key, {}).get(stage, {})
        if sorted(parts) != list(range(tp)):
            raise CheckpointError(f"{where}: role {role!r}: {key} lacks tensor-parallel slices of {layout}")
        out.params[key] = ps.from_locals([parts[r] for r in range(tp)])
        for k in names:
            pieces = [locals_.get((stage, r, ps.local_name)) for r in range(tp)]
            if any(p is None or k not in p.states or not bool(p.covered[k].all()) for p in pieces):
                raise CheckpointError(
                    f"{where}: role {role!r}: the optimizer state {k} of {key} is incomplete"
                )
            shape = ps.local_shape(tp)
            out.states.setdefault(k, {})[key] = ps.from_locals(
                [p.states[k].reshape(shape) for p in pieces if p is not None]
            )
    return out


@torch.no_grad()
def load_canonical(engine: TrainEngine, state: CanonicalState) -> None:
    """Slice ``state`` into the engine's shard and optimizer on this rank (its layout position,
    its ZeRO-1 slice); ranks outside the layout only take the step count."""
    engine.steps = state.steps
    shard, sharded = engine.shard, engine.sharded
    if not shard.member or sharded is None:
        return
    tp_rank, tp = shard.groups.tp_rank, shard.layout.tp
    for ps, p in shard.params():
        p.copy_(ps.to_local(state.params[ps.key].to(p.dtype), tp_rank, tp))
    flat: dict[tuple[str, str], torch.Tensor] = {}

    def local(name: str, ps: ParamSpec) -> torch.Tensor:
        if (name, ps.local_name) not in flat:
            source = state.states[name] if name in state.states else {ps.key: state.params[ps.key].float()}
            flat[(name, ps.local_name)] = ps.to_local(source[ps.key], tp_rank, tp).reshape(-1)
        return flat[(name, ps.local_name)]

    wanted = [k for k in ADAM_MOMENTS if k in state.states]
    if sharded.master is not None:
        wanted.append(MASTER)  # the saved masters, else (saved without them) the parameters
    values = [{k: local(k, piece.slot.spec)[piece.lo : piece.hi] for k in wanted} for piece in sharded.pieces]
    sharded.load_pieces(values, state.step)
