"""A model's shard on this rank: its spec, its layout's groups and the megatron module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.layout import Layout
from lightning_real.models.build import BuildOptions, build_gpt
from lightning_real.models.sharding import ParamSpec, load_canonical_, named_local_params
from lightning_real.models.spec import ModelSpec

if TYPE_CHECKING:
    # megatron-core ships no type information: its GPTModel reads as Any to the checker.
    from megatron.core.models.gpt import GPTModel


@dataclass
class ModelShard:
    """This rank's part of one model under one layout (``module`` is None outside the layout)."""

    spec: ModelSpec
    """Architecture of the whole model."""
    groups: LayoutGroups
    """Process groups of the layout on this rank."""
    module: GPTModel | None
    """megatron-core GPTModel shard, or None when this rank is not in the layout."""

    @property
    def layout(self) -> Layout:
        """The resolved layout."""
        return self.groups.layout

    @property
    def member(self) -> bool:
        """Whether this rank holds part of the model."""
        return self.module is not None

    @classmethod
    def build(
        cls, spec: ModelSpec, groups: LayoutGroups, seed: int = 0, options: BuildOptions | None = None
    ) -> ModelShard:
        """Build (randomly initialised) on the layout's ranks; other ranks get an empty shard."""
        module = build_gpt(spec, groups, seed=seed, options=options) if groups.member else None
        return cls(spec, groups, module)

    @classmethod
    def from_canonical(
        cls,
        spec: ModelSpec,
        groups: LayoutGroups,
        tensors: dict[str, torch.Tensor],
        options: BuildOptions | None = None,
    ) -> ModelShard:
        """Build and fill with this rank's slices of the canonical ``tensors`` (cast to the
        options' dtype)."""
        shard = cls.build(spec, groups, options=options)
        if shard.module is not None:
            load_canonical_(shard.module, spec, shard.layout, groups.rank, tensors)
        return shard

    def params(self) -> list[tuple[ParamSpec, nn.Parameter]]:
        """This rank's parameters with their sharding descriptions (empty outside the layout)."""
        if self.module is None:
            return []
        return named_local_params(self.module, self.spec, self.layout, self.groups.rank)
