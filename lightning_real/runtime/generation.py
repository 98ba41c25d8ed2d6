"""The engine a generate call samples with, as the runtime builds it for the run's features.

``native`` is this package's generator (:func:`lightning_real.models.generate.generate`): any
tensor/pipeline split, per-row seeded streams, the same tokens under any layout.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lightning_real.models.generate import GenerationConfig, GenerationOutput, generate
from lightning_real.models.shard import ModelShard


class Generator(Protocol):
    """What a generate call needs of its engine."""

    backend: str
    """The engine's name ('native', 'vllm')."""

    def generate(
        self,
        shard: ModelShard,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        row_offset: int | None,
    ) -> GenerationOutput:
        """Responses to left-padded ``prompts`` from ``shard``'s current parameters."""
        ...


class NativeGenerator:
    """The package's own generator over the call's megatron-core shard."""

    backend = "native"

    def generate(
        self,
        shard: ModelShard,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        row_offset: int | None,
    ) -> GenerationOutput:
        return generate(shard, prompts, prompt_mask, config, row_offset=row_offset)


def make_generator(backend: str) -> Generator:
    """The engine of ``backend`` (``RuntimeFeatures.generation_backend``)."""
    if backend == "native":
        return NativeGenerator()
    raise ValueError(f"generation_backend={backend!r}; allowed: native")
