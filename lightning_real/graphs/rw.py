"""Reward modelling's graph: one ``rew_train`` call on preference pairs."""

from __future__ import annotations

from lightning_real.dataflow import DataflowGraph
from lightning_real.graphs.common import PAIR_SOURCES, train_only_graph


def rw_graph(batch_size: int, n_mbs: int = 1, seq_len: int = 256) -> DataflowGraph:
    """Reward-model training on preference pairs: one ``rew_train`` call (Bradley-Terry loss)."""
    return train_only_graph("rw", "rew_train", "reward", PAIR_SOURCES, batch_size, n_mbs, seq_len)
