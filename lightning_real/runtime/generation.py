"""The engine a generate call samples with, as the runtime builds it for the run's features.

``native`` is this package's generator (:func:`lightning_real.models.generate.generate`): any
tensor/pipeline split, per-row seeded streams, the same tokens under any layout. ``vllm`` is an
in-process vLLM engine per data-parallel replica (:mod:`lightning_real.runtime.vllm_generation`).

A generate call's microbatches are *rounds*: the replica's rows are generated in that many
consecutive groups, each with a KV cache of its own rows only, so a batch whose cache would not
fit is generated in parts (the planner prices exactly this). Rows sample from streams keyed by
their global index, so the tokens do not depend on the number of rounds.
"""

from __future__ import annotations

from typing import Protocol

import torch

from lightning_real.features import VllmConfig
from lightning_real.models.generate import GenerationConfig, GenerationOutput, generate
from lightning_real.models.shard import ModelShard


class Generator(Protocol):
    """What a generate call needs of its engine."""

    backend: str
    """The engine's name ('native', 'vllm')."""
    last_logprob_diff: float | None
    """Mean absolute gap between the engine's own log-probs and the shard's for the latest
    call's response tokens; None where the engine has none of its own (native) or they were not
    comparable."""

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
    """The package's own generator over the call's megatron-core shard, in ``rounds`` rounds."""

    backend = "native"

    def __init__(self, rounds: int = 1) -> None:
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"NativeGenerator rounds={rounds!r}; allowed: an integer >= 1")
        self.rounds = rounds
        # its log-probs are the shard's own: there is no gap to report
        self.last_logprob_diff: float | None = None

    def generate(
        self,
        shard: ModelShard,
        prompts: torch.Tensor,
        prompt_mask: torch.Tensor,
        config: GenerationConfig,
        row_offset: int | None,
    ) -> GenerationOutput:
        b = prompts.shape[0]
        if self.rounds > b:
            raise ValueError(f"{self.rounds} generation rounds exceed the {b} rows of this replica")
        parts = []
        for idx in torch.arange(b).tensor_split(self.rounds):
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            offset = None if row_offset is None else row_offset + lo
            parts.append(generate(shard, prompts[lo:hi], prompt_mask[lo:hi], config, row_offset=offset))
        if len(parts) == 1:
            return parts[0]
        return GenerationOutput(
            tokens=torch.cat([p.tokens for p in parts]),
            response_logprobs=torch.cat([p.response_logprobs for p in parts]),
            response_mask=torch.cat([p.response_mask for p in parts]),
            response_lengths=torch.cat([p.response_lengths for p in parts]),
            truncated=torch.cat([p.truncated for p in parts]),
        )


def make_generator(backend: str, rounds: int = 1, vllm: VllmConfig | None = None) -> Generator:
    """The engine of ``backend`` (``RuntimeFeatures.generation_backend``) in ``rounds`` rounds;
    ``vllm``: how a vLLM engine starts."""
    if backend == "native":
        return NativeGenerator(rounds)
    if backend == "vllm":
        # Imported here: vLLM is an optional extra, and only this backend needs it.
        from lightning_real.runtime.vllm_generation import VllmGenerator

        return VllmGenerator(rounds, vllm)
    raise ValueError(f"generation_backend={backend!r}; allowed: native, vllm")
