"""AdamW over this rank's part of a model, its learning-rate schedule and global-norm clipping.

The optimizer is ``torch.optim.AdamW`` over the rank's part of the flat buffers
(:mod:`lightning_real.models.flat`): all of its parameters when every data-parallel replica keeps
the full optimizer state, a 1/dp slice of them under ZeRO-1. Adam is elementwise, so a slice of
a parameter updates exactly as the whole would: each state equals the matching slice of the
single-device state. Under 'bf16-mixed' the optimizer updates fp32 master copies and writes the
result back into the bf16 working parameters. What needs the layout is the gradient norm: it is
taken over the whole model, so each canonical element must be counted exactly once although
some parameters are held by several ranks (norms, row-parallel biases, learned positions and
the value head on every tensor-parallel rank; the tied output copy on the last pipeline stage).

megatron-core's ``DistributedOptimizer`` is not used: in 0.16 it accepts only CUDA tensors (it
checks ``param.type()`` against ``torch.cuda.*Tensor`` and allocates its buffers with
``torch.cuda.current_device()``), so it cannot run the CPU reference on gloo, and one code path
for both is what the parity tests on gloo can vouch for on NCCL (docs/engine.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.flat import FlatBuffers, Slot
from lightning_real.models.sharding import WORD_EMBEDDINGS, ParamSpec


@dataclass(frozen=True)
class OptimConfig:
    """AdamW hyper-parameters, learning-rate schedule and gradient clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam coefficients of the running averages of the gradient and its square."""
    eps: float = 1e-8
    """Adam denominator term."""
    weight_decay: float = 0.0
    """Decoupled weight decay, applied to matrices (embeddings, projections, heads) only."""
    max_grad_norm: float | None = 1.0
    """Clip gradients to this global L2 norm; None or 0 disables clipping (the norm is still reported)."""
    warmup_steps: int = 0
    """Steps of linear warm-up from lr/warmup_steps to lr."""
    decay_steps: int = 0
    """Steps of cosine decay from lr to min_lr after warm-up; 0 keeps lr constant."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"OptimConfig.lr={self.lr!r}; allowed: a positive number")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas={self.betas!r}; allowed: two numbers in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"OptimConfig.eps={self.eps!r}; allowed: a positive number")
        if self.weight_decay < 0:
            raise ValueError(f"OptimConfig.weight_decay={self.weight_decay!r}; allowed: a number >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(
                f"OptimConfig.max_grad_norm={self.max_grad_norm!r}; allowed: None, 0 (off) or a positive number"
            )
        for name in ("warmup_steps", "decay_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"OptimConfig.{name}={v!r}; allowed: an integer >= 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"OptimConfig.min_lr={self.min_lr!r}; allowed: a number in [0, lr={self.lr}]")


def lr_at(config: OptimConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then constant or cosine."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.decay_steps == 0:
        return config.lr
    t = min(step - config.warmup_steps, config.decay_steps) / config.decay_steps
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * t))


def decays(ps: ParamSpec) -> bool:
    """Whether weight decay applies: matrices do, vectors (norms, biases) do not."""
    return len(ps.canonical_shape) >= 2


def counts_once(ps: ParamSpec, groups: LayoutGroups, tied_pp: bool) -> bool:
    """Whether this rank's copy of ``ps`` enters the global norm (each element exactly once)."""
    if ps.tp_dim is None and groups.tp_rank != 0:
        return False  # replicated over tensor-parallel ranks: tp rank 0 speaks for all
    # The tied output copy on the last stage repeats the first stage's embedding.
    return not (tied_pp and ps.key == WORD_EMBEDDINGS and not groups.is_first_stage)


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g["lr"] = lr


def grad_norm(flat: FlatBuffers, tied_pp: bool) -> float:
    """L2 norm of the whole model's reduced gradient (every canonical element once).

    Each rank sums the elements of its part it speaks for; the layout's ranks then add their
    sums: over the model-parallel group when every replica holds all gradients, over the whole
    layout when each replica holds a 1/dp slice.
    """
    g = flat.groups
    sq = torch.zeros((), dtype=torch.float64, device=flat.grads.device)
    for slot, a, b in flat.pieces():
        if counts_once(slot.spec, g, tied_pp):
            # accumulated in fp64 inside the reduction, without an fp64 copy of the piece
            sq += torch.linalg.vector_norm(flat.grads[a:b], dtype=torch.float64).square()
    group, size = (g.all, g.layout.size) if flat.shards > 1 else (g.mp, g.layout.tp * g.layout.pp)
    if size > 1:
        dist.all_reduce(sq, group=group)
    return float(sq.sqrt())


@torch.no_grad()
def clip_(flat: FlatBuffers, max_norm: float | None, total_norm: float) -> float:
    """Scale this rank's gradients so the global norm is at most ``max_norm``; the factor used.

    Same rule as ``torch.nn.utils.clip_grad_norm_``: factor = max_norm / (norm + 1e-6), capped at 1.
    """
    if not max_norm:
        return 1.0
    coef = min(1.0, max_norm / (total_norm + 1e-6))
    if coef < 1.0:
        flat.grad_shard().mul_(coef)
    return coef


ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
"""The per-element states of torch's AdamW (its ``step`` is one count per tensor)."""


@dataclass(frozen=True)
class OptimPiece:
    """One tensor AdamW updates: elements ``[lo, hi)`` of one parameter, flattened."""

    slot: Slot
    """The parameter it is part of."""
    lo: int
    """First element of the (flattened) parameter."""
    hi: int
    """One past the last."""
    index: int
    """Its index in the torch optimizer's state (parameter groups in order)."""


def _fusable(tensors: list[torch.Tensor]) -> bool | None:
    """Whether torch's fused AdamW serves these tensors (None: torch's default implementation)."""
    ok = all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return True if ok and tensors else None


class ShardedAdamW:
    """AdamW over this rank's part of the flat buffers (all of them, or a ZeRO-1 slice).

    The tensors it updates: a parameter itself when this rank holds all of it and no master copy
    is kept (so a replicated fp32 run has plain per-parameter AdamW state), else a view of the
    parameter buffer, or of the fp32 master copy of this rank's slice under 'bf16-mixed'. Two
    groups, with and without weight decay, in parameter order.
    """

    def __init__(self, flat: FlatBuffers, config: OptimConfig, master_weights: bool) -> None:
        self.flat = flat
        self.master: torch.Tensor | None = flat.param_shard().float().clone() if master_weights else None
        lo, _ = flat.shard_range
        decay: list[torch.Tensor] = []
        plain: list[torch.Tensor] = []
        self._grads: list[tuple[torch.Tensor, torch.Tensor]] = []
        placed: list[tuple[Slot, int, int, bool, int]] = []
        for slot, a, b in flat.pieces():
            whole = (a, b) == (slot.start, slot.start + slot.numel)
            if self.master is not None:
                t: torch.Tensor = self.master[a - lo : b - lo]
            elif whole:
                t = slot.param
            else:
                t = flat.params[a:b]
            grad = slot.param.main_grad if t is slot.param else flat.grads[a:b]  # type: ignore[attr-defined]
            group = decay if decays(slot.spec) else plain
            placed.append((slot, a - slot.start, b - slot.start, group is decay, len(group)))
            group.append(t)
            self._grads.append((t, grad))
        self.pieces = [
            OptimPiece(slot, a, b, i if in_decay else len(decay) + i) for slot, a, b, in_decay, i in placed
        ]
        """What each tensor AdamW updates covers, in flat-buffer order (the master copy's order)."""
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        # torch's fused kernel: one pass per tensor with no temporaries, on CPU and CUDA alike
        # (the per-tensor loop writes two state-sized temporaries per tensor: 3.6x slower here).
        self.torch = torch.optim.AdamW(
            groups, lr=lr_at(config, 0), betas=config.betas, eps=config.eps, fused=_fusable(decay + plain)
        )

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One AdamW update at ``lr`` from the reduced gradients; then every replica's parameters."""
        for t, grad in self._grads:
            t.grad = grad
        set_lr_(self.torch, lr)
        self.torch.step()
        if self.master is not None:
            self.flat.param_shard().copy_(self.master)
        self.flat.gather_params()

    def state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: Adam's moments and the master copy."""
        n = sum(
            v.numel() * v.element_size()
            for st in self.torch.state.values()
            for v in st.values()
            if torch.is_tensor(v) and v.dim() > 0
        )
        if self.master is not None:
            n += self.master.numel() * self.master.element_size()
        return n

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state, the master copy, and what each of its tensors covers:
        ``pieces`` lists ``(parameter's local name, lo, hi, state index)`` in flat-buffer order,
        elements ``[lo, hi)`` of the flattened parameter (the master copy concatenates them)."""
        out: dict[str, Any] = {
            "optimizer": self.torch.state_dict(),
            "pieces": [(p.slot.spec.local_name, p.lo, p.hi, p.index) for p in self.pieces],
        }
        if self.master is not None:
            out["master"] = self.master.detach().cpu().clone()
        return out

    @torch.no_grad()
    def load_pieces(self, values: list[dict[str, torch.Tensor]], step: torch.Tensor | None) -> None:
        """Set the state of every piece (in :attr:`pieces` order) from flat tensors of its
        ``hi - lo`` elements: Adam's moments (``exp_avg``, ``exp_avg_sq``; absent: no step taken
        yet) and ``master`` (with master weights). ``step``: torch's per-tensor step count."""
        if len(values) != len(self.pieces):
            raise ValueError(f"{len(values)} piece states for {len(self.pieces)} optimizer pieces")
        ordered = [t for g in self.torch.param_groups for t in g["params"]]
        state: dict[int, dict[str, torch.Tensor]] = {}
        offset = 0
        for piece, value in zip(self.pieces, values):
            t = ordered[piece.index]
            if step is not None and all(k in value for k in ADAM_MOMENTS):
                moments = {k: value[k].reshape(t.shape).to(t.dtype).clone() for k in ADAM_MOMENTS}
                state[piece.index] = {"step": step.clone(), **moments}
            n = piece.hi - piece.lo
            if self.master is not None:
                self.master[offset : offset + n].copy_(value["master"])
            offset += n
        saved = self.torch.state_dict()
        self.torch.load_state_dict({"state": state, "param_groups": saved["param_groups"]})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (same layout position, precision and sharding)."""
        self.torch.load_state_dict(state["optimizer"])
        if self.master is not None:
            if "master" not in state:
                raise ValueError(
                    "the saved optimizer state has no fp32 master weights (saved without bf16-mixed)"
                )
            self.master.copy_(state["master"])
