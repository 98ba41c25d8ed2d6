"""Which slice of every canonical tensor each rank of a layout holds, in plan coordinates.

Reallocation works on the *view* of each canonical tensor that tensor parallelism splits
(:class:`~lightning_real.models.sharding.ParamSpec`). The view does not depend on the layout, and
neither does the split dimension, so a rank's slice is one range ``[lo, hi)`` along that
dimension (the whole range for replicated parameters), and slices of two layouts intersect as
plain ranges.

A padded vocabulary (:attr:`ModelSpec.pad_vocab_to_multiple_of`) is cut at each layout's padded
boundaries and clipped to the canonical rows; padding rows are never moved (each layout keeps its
own, zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from lightning_real.layout import Layout, LayoutError
from lightning_real.models.sharding import ParamSpec, canonical_keys, stage_param_specs
from lightning_real.models.spec import ModelSpec
from lightning_real.models.spec import check_layout as check_split


@dataclass(frozen=True)
class KeyGeometry:
    """How one canonical tensor is cut: the view, the cut dimension and whether tp splits it."""

    key: str
    """Canonical tensor name."""
    view_shape: tuple[int, ...]
    """Shape of the view that tensor parallelism splits (layout-independent)."""
    dim: int
    """Dimension of the view that pieces are ranges of (0 for replicated tensors)."""
    split: bool
    """Whether tensor parallelism splits ``dim``; replicated tensors are held whole by every tp rank."""
    pad_multiple: int | None = None
    """Vocabulary rows: ``dim`` is padded to a multiple of ``pad_multiple * tp`` on each layout."""

    @property
    def length(self) -> int:
        """Size of the view along ``dim``."""
        return self.view_shape[self.dim]

    @property
    def row_elems(self) -> int:
        """Elements in one index of ``dim`` (a "row" of the view)."""
        return math.prod(self.view_shape) // self.length

    @property
    def numel(self) -> int:
        """Elements of the whole canonical tensor."""
        return math.prod(self.view_shape)

    def local_length(self, tp: int) -> int:
        """Rows along ``dim`` of one rank's local tensor under ``tp`` (padding included)."""
        if not self.split:
            return self.length
        if self.pad_multiple is None:
            return self.length // tp
        m = self.pad_multiple * tp
        return -(-self.length // m) * m // tp

    def chunk(self, tp_rank: int, tp: int) -> tuple[int, int]:
        """``[lo, hi)`` along ``dim`` held by tensor-parallel rank ``tp_rank`` of ``tp`` (clipped
        to the canonical rows, so possibly empty under a padded vocabulary)."""
        if not self.split:
            return 0, self.length
        size = self.local_length(tp)
        return min(tp_rank * size, self.length), min((tp_rank + 1) * size, self.length)

    def local_view_shape(self, tp: int) -> tuple[int, ...]:
        """Shape of the view of one rank's local tensor under tensor-parallel degree ``tp``."""
        v = list(self.view_shape)
        v[self.dim] = self.local_length(tp)
        return tuple(v)


def geometry_of(ps: ParamSpec) -> KeyGeometry:
    """The plan geometry of one parameter description."""
    return KeyGeometry(ps.key, ps.view_shape, ps.tp_dim or 0, ps.tp_dim is not None, ps.pad_multiple)


@lru_cache(maxsize=256)
def key_geometry(spec: ModelSpec) -> dict[str, KeyGeometry]:
    """Geometry of every canonical tensor of ``spec``, in layer order."""
    out = {ps.key: geometry_of(ps) for ps in stage_param_specs(spec, 1, 0)}
    return {k: out[k] for k in canonical_keys(spec)}


@lru_cache(maxsize=1024)
def stage_keys(spec: ModelSpec, pp: int, stage: int) -> tuple[str, ...]:
    """Canonical keys one pipeline stage holds (a tied embedding may be held by two stages)."""
    return tuple(ps.key for ps in stage_param_specs(spec, pp, stage))


@dataclass(frozen=True)
class Holding:
    """One rank's slice of one canonical tensor under one layout."""

    rank: int
    """Global rank."""
    tp_rank: int
    """Tensor-parallel index of the rank (its chunk of a split tensor)."""
    lo: int
    """Start of the slice along the key's ``dim``."""
    hi: int
    """End (exclusive) of the slice along the key's ``dim``."""


def require_resolved(layout: Layout, what: str) -> Layout:
    """``layout`` itself when it names its ranks; a clear error otherwise."""
    if layout.ranks is None:
        raise LayoutError(
            f"{what} layout {layout}: ranks are unknown; pass a resolved layout "
            f"(layout.resolve(world_size)) or give ranks like '{layout}@0-{layout.size - 1}'"
        )
    return layout


@lru_cache(maxsize=256)
def holdings(spec: ModelSpec, layout: Layout) -> dict[str, tuple[Holding, ...]]:
    """For every canonical key, the slices held by the ranks of ``layout`` (stage, then dp, then tp)."""
    require_resolved(layout, "the")
    geo = key_geometry(spec)
    out: dict[str, list[Holding]] = {k: [] for k in geo}
    for s in range(layout.pp):
        for key in stage_keys(spec, layout.pp, s):
            g = geo[key]
            for d in range(layout.dp):
                for t in range(layout.tp):
                    lo, hi = g.chunk(t, layout.tp)
                    out[key].append(Holding(layout.rank_at(d, t, s), t, lo, hi))
    return {k: tuple(v) for k, v in out.items()}


def check_layout(spec: ModelSpec, layout: Layout, what: str) -> Layout:
    """A resolved layout that can hold ``spec`` (heads and layers divide as required)."""
    require_resolved(layout, what)
    return check_split(spec, layout)


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()
