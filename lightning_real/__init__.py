"""lightning-real: RLHF in PyTorch Lightning with parameter reallocation between per-call layouts."""

from lightning_real.layout import Layout, LayoutError, parse_layout

__all__ = ["Layout", "LayoutError", "parse_layout"]
__version__ = "0.1.0"
