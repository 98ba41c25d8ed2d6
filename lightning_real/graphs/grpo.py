"""GRPO's graph: ``actor_gen`` samples ``group_size`` responses per prompt; no critic."""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.graphs.common import GEN_KEYS, PPO_SOURCES, SEQ_KEYS, Microbatches, finish, mbs


def grpo_graph(
    batch_size: int,
    group_size: int,
    n_mbs: Microbatches = 1,
    minibatches: int = 1,
    use_ref: bool = True,
    prompt_len: int = 128,
    gen_len: int = 128,
) -> DataflowGraph:
    """GRPO: no critic; ``actor_gen`` samples ``group_size`` responses per prompt.

    ``batch_size`` counts sequences (prompts x group_size). Without ``use_ref`` (KL coefficient 0)
    the reference call is left out.
    """
    common: dict[str, Any] = dict(
        batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, group_size=group_size
    )
    calls = [
        MFC("actor_gen", "actor", "generate", PPO_SOURCES, GEN_KEYS, n_mbs=mbs(n_mbs, "actor_gen"), **common),
        MFC("rew_inf", "reward", "inference", SEQ_KEYS, ("rewards",), n_mbs=mbs(n_mbs, "rew_inf"), **common),
    ]
    train_in = [*GEN_KEYS, "rewards"]
    if use_ref:
        calls.insert(
            1,
            MFC(
                "ref_inf", "ref", "inference", SEQ_KEYS, ("ref_logp",), n_mbs=mbs(n_mbs, "ref_inf"), **common
            ),
        )
        train_in.append("ref_logp")
    calls.append(
        MFC(
            "actor_train",
            "actor",
            "train",
            tuple(train_in),
            (),
            n_mbs=mbs(n_mbs, "actor_train"),
            minibatches=minibatches,
            **common,
        )
    )
    return finish(calls, PPO_SOURCES, "grpo", n_mbs)
