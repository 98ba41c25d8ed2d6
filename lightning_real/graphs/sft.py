"""Supervised fine-tuning's graph: one ``actor_train`` call."""

from __future__ import annotations

from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import SFT_SOURCES, train_only_graph


def sft_graph(batch_size: int, n_mbs: int = 1, seq_len: int = 256) -> DataflowGraph:
    """Supervised fine-tuning: one ``actor_train`` call on prompt + response sequences."""
    return train_only_graph("sft", "actor_train", "actor", SFT_SOURCES, batch_size, n_mbs, seq_len)
