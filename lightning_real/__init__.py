"""lightning-real: RLHF in PyTorch Lightning with parameter reallocation between per-call layouts."""

from __future__ import annotations

import sys
from typing import Any

from lightning_real import quiet
from lightning_real.layout import Layout, LayoutError, parse_layout
from lightning_real.registry import MODULE_PATHS

# Before any megatron-core import: its known-harmless warnings are filtered at their source.
quiet.install()

__all__ = [
    "DPOModule",
    "GRPOModule",
    "Layout",
    "LayoutError",
    "PPOModule",
    "RLHFModule",
    "ReMaxModule",
    "RealStrategy",
    "RewardModelModule",
    "RuntimeFeatures",
    "SFTModule",
    "parse_layout",
]
__version__ = "0.1.0"

_LAZY = {
    "RealStrategy": "lightning_real.strategy",
    "RLHFModule": "lightning_real.module",
    "RuntimeFeatures": "lightning_real.features",
    **MODULE_PATHS,
}


def __getattr__(name: str) -> Any:
    # Heavy imports (Lightning, megatron-core) wait until used, so the planner CLI starts fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_real' has no attribute {name!r}")


def _register_strategy() -> None:
    """Make ``Trainer(strategy="real")`` work once both packages are imported."""
    from lightning.pytorch.strategies import StrategyRegistry

    from lightning_real.strategy import RealStrategy

    if "real" not in StrategyRegistry:
        RealStrategy.register_strategies(StrategyRegistry)


if "lightning.pytorch" in sys.modules:
    _register_strategy()
