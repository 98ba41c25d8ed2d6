"""Where a role's model comes from: an HF checkpoint folder, or a ModelSpec for a random init."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning_real.distributed.groups import LayoutGroups
from lightning_real.models.build import BuildOptions
from lightning_real.models.shard import ModelShard
from lightning_real.models.sharding import random_canonical
from lightning_real.models.spec import ModelSpec

ModelSource = str | Path | ModelSpec
"""An HF checkpoint folder, or a ModelSpec for a randomly initialised model (tests, demos)."""


def spec_of(source: ModelSource, head: Literal["lm", "value"]) -> ModelSpec:
    """The ModelSpec of a source, with the given head (reads only ``config.json``)."""
    if isinstance(source, ModelSpec):
        return source.with_head(head)
    path = Path(source)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model path {path} has no config.json (expected an HF checkpoint folder)")
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(path)
    return ModelSpec.from_hf_config(cfg, head=head)


def load_shard(
    source: ModelSource,
    spec: ModelSpec,
    groups: LayoutGroups,
    seed: int,
    init_value_head: bool = False,
    options: BuildOptions | None = None,
) -> ModelShard:
    """This rank's shard of ``source`` on ``groups.layout`` (collective over the layout).

    A ModelSpec source is initialised from ``seed`` (the same model under any layout).
    ``init_value_head``: a value-head model read from a causal-LM folder starts its head at zero
    (a critic initialised from the actor, a reward model from the SFT model).
    """
    if isinstance(source, ModelSpec):
        return ModelShard.from_canonical(spec, groups, random_canonical(spec, seed), options=options)
    from lightning_real.models.hf import load_hf

    return load_hf(source, groups, head=spec.head, init_value_head=init_value_head, options=options)
