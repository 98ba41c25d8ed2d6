"""How each megatron-core parameter of a layout maps onto one layout-independent tensor.

Every parameter of a sharded model is a slice of a *canonical* tensor: the tensor the same
parameter would be with tp=1 and pp=1, named with its global layer index
(``decoder.layers.7.mlp.linear_fc2.weight``). HF import/export converts between HF tensors and
canonical ones; reallocation intersects the slices of two layouts in canonical coordinates.

Tensor parallelism always splits one dimension of a *view* of the canonical tensor into ``tp``
equal contiguous chunks:

* fused QKV is stored by megatron grouped per key/value head (``[q..q k v]`` per group), so a
  contiguous split of dim 0 gives each rank whole groups: view = canonical, dim 0;
* the SwiGLU input projection is ``[gate; up]`` per rank, so its view is ``[2, ffn, hidden]``
  split on dim 1;
* column-parallel weights (vocab, fc1) split dim 0, row-parallel ones (proj, fc2) split dim 1;
* norms, row-parallel biases, learned positions and the value head are replicated.

Vocabulary rows (embedding, LM head) are padded per layout to a multiple of
``spec.pad_vocab_to_multiple_of * tp`` (:meth:`ModelSpec.padded_vocab_size`): tp rank ``r`` holds
rows ``[r * P/tp, (r+1) * P/tp)`` of the padded matrix, of which only those below the vocabulary
size are canonical rows; the rest are zero on the rank. Canonical tensors keep the unpadded HF
shape, so every layout (and the HF checkpoint) agrees on them however it pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lightning_real.layout import Layout
from lightning_real.models.build import stage_layer_range
from lightning_real.models.spec import ModelSpec

WORD_EMBEDDINGS = "embedding.word_embeddings.weight"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of one pipeline stage, and where it sits in its canonical tensor."""

    local_name: str
    """Name in the stage's megatron module (local layer index)."""
    key: str
    """Canonical tensor it is a slice of (global layer index); tied output weights name the embedding."""
    canonical_shape: tuple[int, ...]
    """Shape of the canonical (tp=1) tensor."""
    view_shape: tuple[int, ...]
    """Shape the canonical tensor is viewed as before splitting over tensor-parallel ranks."""
    tp_dim: int | None
    """Dimension of the view split into tp chunks; None when every tp rank holds it all."""
    pad_multiple: int | None = None
    """Vocabulary rows: ``tp_dim`` is padded to a multiple of ``pad_multiple * tp`` on each
    layout (zero rows after the canonical ones); None for every other parameter."""

    def split_length(self, tp: int) -> int:
        """Length of ``tp_dim`` of the view once padded for ``tp`` (the view's own when unpadded)."""
        assert self.tp_dim is not None
        n = self.view_shape[self.tp_dim]
        if self.pad_multiple is None:
            return n
        m = self.pad_multiple * tp
        return -(-n // m) * m

    def local_shape(self, tp: int) -> tuple[int, ...]:
        """Shape of the parameter on one tensor-parallel rank (padding included)."""
        if self.tp_dim is None:
            return self.canonical_shape
        view = list(self.view_shape)
        view[self.tp_dim] = self.split_length(tp) // tp
        if self.view_shape == self.canonical_shape:
            return tuple(view)
        # A reshaped view (SwiGLU fc1) always splits the canonical tensor's leading dimension.
        return (math.prod(view) // math.prod(self.canonical_shape[1:]), *self.canonical_shape[1:])

    def chunk(self, tp_rank: int, tp: int) -> tuple[int, int]:
        """``[start, stop)`` along ``tp_dim`` of the canonical view held by ``tp_rank``.

        With padding the chunk is cut at the padded boundaries and clipped to the canonical
        length: it can be shorter than the local tensor, or empty.
        """
        if self.tp_dim is None:
            return 0, self.view_shape[0] if self.view_shape else 1
        n = self.view_shape[self.tp_dim]
        size = self.split_length(tp) // tp
        return min(tp_rank * size, n), min((tp_rank + 1) * size, n)

    def to_local(self, canonical: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
        """The slice of ``canonical`` held by ``tp_rank`` (a new contiguous tensor, padding zero)."""
        if tuple(canonical.shape) != self.canonical_shape:
            raise ValueError(
                f"{self.key}: expected a tensor of shape {self.canonical_shape}, got {tuple(canonical.shape)}"
            )
        if self.tp_dim is None:
            return canonical.clone()
        lo, hi = self.chunk(tp_rank, tp)
        part = canonical.reshape(self.view_shape).narrow(self.tp_dim, lo, hi - lo)
        if self.pad_multiple is None:
            return part.contiguous().reshape(self.local_shape(tp))
        out = canonical.new_zeros(self.local_shape(tp))
        out.narrow(self.tp_dim, 0, hi - lo).copy_(part)
        return out

    def from_locals(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Reassemble the canonical tensor from the slices of tp ranks 0..tp-1 (padding dropped)."""
        if self.tp_dim is None:
            return parts[0].clone()
        tp = len(parts)
        view = list(self.view_shape)
        view[self.tp_dim] = self.split_length(tp) // tp
        kept = []
        for r, p in enumerate(parts):
            lo, hi = self.chunk(r, tp)
            kept.append(p.reshape(view).narrow(self.tp_dim, 0, hi - lo))
        return torch.cat(kept, dim=self.tp_dim).reshape(self.canonical_shape)


def _layer_params(spec: ModelSpec, g: int, local: int) -> list[ParamSpec]:
    h, f = spec.hidden_size, spec.ffn_hidden_size
    qkv = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    pre_l, pre_g = f"decoder.layers.{local}.", f"decoder.layers.{g}."
    out: list[ParamSpec] = []

    def add(
        name: str, shape: tuple[int, ...], tp_dim: int | None, view: tuple[int, ...] | None = None
    ) -> None:
        out.append(ParamSpec(pre_l + name, pre_g + name, shape, view or shape, tp_dim))

    norms = ("weight", "bias") if spec.has_bias else ("weight",)
    for p in norms:
        add(f"input_layernorm.{p}", (h,), None)
    add("self_attention.linear_qkv.weight", (qkv, h), 0)
    if spec.qkv_bias:
        add("self_attention.linear_qkv.bias", (qkv,), 0)
    add("self_attention.linear_proj.weight", (h, h), 1)
    if spec.has_bias:
        add("self_attention.linear_proj.bias", (h,), None)
    for p in norms:
        add(f"pre_mlp_layernorm.{p}", (h,), None)
    if spec.gated_mlp:
        add("mlp.linear_fc1.weight", (2 * f, h), 1, (2, f, h))
        if spec.has_bias:
            add("mlp.linear_fc1.bias", (2 * f,), 1, (2, f))
    else:
        add("mlp.linear_fc1.weight", (f, h), 0)
        if spec.has_bias:
            add("mlp.linear_fc1.bias", (f,), 0)
    add("mlp.linear_fc2.weight", (h, f), 1)
    if spec.has_bias:
        add("mlp.linear_fc2.bias", (h,), None)
    return out


def stage_param_specs(spec: ModelSpec, pp: int, stage: int) -> list[ParamSpec]:
    """Parameters held by one pipeline stage (identical for every tp and dp rank of it)."""
    h, v = spec.hidden_size, spec.vocab_size
    out: list[ParamSpec] = []
    first, last = stage == 0, stage == pp - 1
    m = spec.pad_vocab_to_multiple_of
    if first:
        out.append(ParamSpec(WORD_EMBEDDINGS, WORD_EMBEDDINGS, (v, h), (v, h), 0, m))
        if spec.learned_positions:
            pos = "embedding.position_embeddings.weight"
            shape = (spec.max_position_embeddings, h)
            out.append(ParamSpec(pos, pos, shape, shape, None))
    for local, g in enumerate(stage_layer_range(spec.num_layers, pp, stage)):
        out.extend(_layer_params(spec, g, local))
    if last:
        for p in ("weight", "bias") if spec.has_bias else ("weight",):
            name = f"decoder.final_layernorm.{p}"
            out.append(ParamSpec(name, name, (h,), (h,), None))
        if spec.head == "value":
            out.append(ParamSpec("output_layer.weight", "output_layer.weight", (1, h), (1, h), None))
        elif not spec.tied_embeddings:
            out.append(ParamSpec("output_layer.weight", "output_layer.weight", (v, h), (v, h), 0, m))
        elif not first:
            # Tied weights on a separate last stage: megatron keeps a copy there, kept equal by
            # an all-reduce of gradients over the embedding group.
            out.append(ParamSpec("output_layer.weight", WORD_EMBEDDINGS, (v, h), (v, h), 0, m))
    return out


def param_specs(spec: ModelSpec, layout: Layout, rank: int) -> list[ParamSpec]:
    """Parameters this global rank holds under ``layout`` (empty when outside it)."""
    c = layout.coords(rank)
    return [] if c is None else stage_param_specs(spec, layout.pp, c[2])


def canonical_keys(spec: ModelSpec) -> list[str]:
    """Every canonical tensor of the model, in layer order."""
    seen: dict[str, None] = {}
    for ps in stage_param_specs(spec, 1, 0):
        seen.setdefault(ps.key, None)
    return list(seen)


def named_local_params(
    model: nn.Module, spec: ModelSpec, layout: Layout, rank: int
) -> list[tuple[ParamSpec, nn.Parameter]]:
    """Pair this rank's parameter specs with the module's actual parameters (checked)."""
    params = dict(model.named_parameters())
    out = []
    tp = layout.tp
    for ps in param_specs(spec, layout, rank):
        if ps.local_name not in params:
            raise KeyError(f"parameter {ps.local_name} expected on rank {rank} under {layout} is missing")
        p = params[ps.local_name]
        if tuple(p.shape) != ps.local_shape(tp):
            raise ValueError(
                f"{ps.local_name}: module shape {tuple(p.shape)} != expected {ps.local_shape(tp)}"
            )
        out.append((ps, p))
    if len(out) != len(params):
        extra = sorted(set(params) - {ps.local_name for ps, _ in out})
        raise KeyError(f"parameters not described by the sharding spec: {extra}")
    return out


def random_canonical(spec: ModelSpec, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """A random model as canonical tensors: the same model under any layout (tests, demos)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for ps in stage_param_specs(spec, 1, 0):
        if ps.key in out:
            continue
        if "layernorm" in ps.key and ps.key.endswith(".weight"):
            t = 1.0 + 0.1 * torch.randn(ps.canonical_shape, generator=gen)
        else:
            t = std * torch.randn(ps.canonical_shape, generator=gen)
        out[ps.key] = t
    return out


@torch.no_grad()
def load_canonical_(
    model: nn.Module, spec: ModelSpec, layout: Layout, rank: int, tensors: dict[str, torch.Tensor]
) -> None:
    """Copy this rank's slices of the canonical ``tensors`` into ``model`` in place."""
    c = layout.coords(rank)
    assert c is not None, f"rank {rank} is not in {layout}"
    for ps, p in named_local_params(model, spec, layout, rank):
        if ps.key not in tensors:
            raise KeyError(f"canonical tensor {ps.key} is missing")
        p.copy_(ps.to_local(tensors[ps.key].to(p.dtype), c[1], layout.tp))
