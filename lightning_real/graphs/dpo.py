"""DPO's graph: the reference scores both answers of each pair, then the actor trains."""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.graphs.common import PAIR_SOURCES, Microbatches, finish, mbs


def dpo_graph(batch_size: int, n_mbs: Microbatches = 1, seq_len: int = 256) -> DataflowGraph:
    """DPO: ``ref_inf`` scores both answers of each pair (``ref_chosen_logp``, ``ref_rejected_logp``,
    summed over response tokens ``[B]``), then ``actor_train``. ``batch_size`` counts pairs."""
    common: dict[str, Any] = dict(batch_size=batch_size, prompt_len=seq_len, gen_len=0)
    ref_out = ("ref_chosen_logp", "ref_rejected_logp")
    calls = [
        MFC("ref_inf", "ref", "inference", PAIR_SOURCES, ref_out, n_mbs=mbs(n_mbs, "ref_inf"), **common),
        MFC(
            "actor_train",
            "actor",
            "train",
            (*PAIR_SOURCES, *ref_out),
            (),
            n_mbs=mbs(n_mbs, "actor_train"),
            **common,
        ),
    ]
    return finish(calls, PAIR_SOURCES, "dpo", n_mbs)
