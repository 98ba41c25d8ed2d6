"""The algorithms this package runs: name -> LightningModule class and graph builder.

The one table recipes (``algorithm: ppo``), the package's lazy exports (``lightning_real.PPOModule``)
and the planner read. Entries name import paths, so nothing heavy is imported until used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Algorithm:
    """One algorithm's LightningModule and dataflow graph builder."""

    name: str
    """Recipe name ('ppo')."""
    module: str
    """Python module of the LightningModule ('lightning_real.modules.ppo')."""
    cls: str
    """Class name of the LightningModule ('PPOModule')."""
    graph: str
    """Graph builder as 'python.module:function' ('lightning_real.graphs.ppo:ppo_graph')."""


GRPO_FAMILY: tuple[str, ...] = (
    "grpo",
    "rloo",
    "reinforce_pp",
    "reinforce_pp_baseline",
    "gspo",
    "dapo",
    "dr_grpo",
)
"""Algorithms run by GRPO's module: GRPO, RLOO, REINFORCE++ and its group-baseline variant, GSPO,
DAPO and Dr. GRPO (the keys of ``lightning_real.algorithms.grpo.PRESETS``)."""

ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("sft", "lightning_real.modules.sft", "SFTModule", "lightning_real.graphs.sft:sft_graph"),
        Algorithm(
            "rw", "lightning_real.modules.rw", "RewardModelModule", "lightning_real.graphs.rw:rw_graph"
        ),
        Algorithm("ppo", "lightning_real.modules.ppo", "PPOModule", "lightning_real.graphs.ppo:ppo_graph"),
        Algorithm(
            "grpo", "lightning_real.modules.grpo", "GRPOModule", "lightning_real.graphs.grpo:grpo_graph"
        ),
        Algorithm(
            "remax", "lightning_real.modules.remax", "ReMaxModule", "lightning_real.graphs.remax:remax_graph"
        ),
        Algorithm("dpo", "lightning_real.modules.dpo", "DPOModule", "lightning_real.graphs.dpo:dpo_graph"),
        # The GRPO family: one module and graph, each name a preset of its settings
        # (lightning_real.algorithms.grpo.PRESETS).
        *(
            Algorithm(
                name, "lightning_real.modules.grpo", "GRPOModule", "lightning_real.graphs.grpo:grpo_graph"
            )
            for name in GRPO_FAMILY[1:]
        ),
    )
}
"""Algorithm name -> entry, in the order recipes document them."""

MODULE_PATHS: dict[str, str] = {a.cls: a.module for a in ALGORITHMS.values()}
"""LightningModule class name -> its Python module (the package's lazy exports)."""


def lookup(name: str) -> Algorithm:
    """The entry of ``name``, or a ValueError listing the allowed names."""
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm={name!r}; allowed: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def module_class(name: str) -> type[Any]:
    """The LightningModule class of algorithm ``name``."""
    a = lookup(name)
    return getattr(importlib.import_module(a.module), a.cls)  # type: ignore[no-any-return]


def graph_builder(name: str) -> Callable[..., Any]:
    """The dataflow graph builder of algorithm ``name``."""
    path, fn = lookup(name).graph.split(":")
    return getattr(importlib.import_module(path), fn)  # type: ignore[no-any-return]
