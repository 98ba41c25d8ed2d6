"""The dataflow graph of each algorithm, one file per algorithm (the generic graph is
:mod:`lightning_real.dataflow`)."""

from lightning_real.graphs.common import GEN_KEYS, PAIR_SOURCES, PPO_SOURCES, SEQ_KEYS, SFT_SOURCES
from lightning_real.graphs.dpo import dpo_graph
from lightning_real.graphs.grpo import grpo_graph
from lightning_real.graphs.ppo import ppo_graph
from lightning_real.graphs.remax import GREEDY_KEYS, remax_graph
from lightning_real.graphs.rw import rw_graph
from lightning_real.graphs.sft import sft_graph

__all__ = [
    "GEN_KEYS",
    "GREEDY_KEYS",
    "PAIR_SOURCES",
    "PPO_SOURCES",
    "SEQ_KEYS",
    "SFT_SOURCES",
    "dpo_graph",
    "grpo_graph",
    "ppo_graph",
    "remax_graph",
    "rw_graph",
    "sft_graph",
]
