"""ReMax's graph: a sampled and a greedy generation of the same prompts, both scored."""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.graphs.common import GEN_KEYS, PPO_SOURCES, SEQ_KEYS, Microbatches, finish, mbs

GREEDY_KEYS: tuple[str, ...] = ("greedy_seq", "greedy_attention_mask", "greedy_loss_mask")
"""What the greedy generation writes (the sequence keys, prefixed)."""


def remax_graph(
    batch_size: int,
    n_mbs: Microbatches = 1,
    use_ref: bool = True,
    prompt_len: int = 128,
    gen_len: int = 128,
) -> DataflowGraph:
    """ReMax: a sampled and a greedy generation of the same prompts, both scored; the greedy
    response's reward (``greedy_rewards``) is the baseline of the sampled one's."""
    common: dict[str, Any] = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len)
    calls = [
        MFC("actor_gen", "actor", "generate", PPO_SOURCES, GEN_KEYS, n_mbs=mbs(n_mbs, "actor_gen"), **common),
        MFC(
            "actor_gen_greedy",
            "actor",
            "generate",
            PPO_SOURCES,
            GREEDY_KEYS,
            n_mbs=mbs(n_mbs, "actor_gen_greedy"),
            greedy=True,
            **common,
        ),
        MFC("rew_inf", "reward", "inference", SEQ_KEYS, ("rewards",), n_mbs=mbs(n_mbs, "rew_inf"), **common),
        MFC(
            "rew_inf_greedy",
            "reward",
            "inference",
            GREEDY_KEYS,
            ("greedy_rewards",),
            n_mbs=mbs(n_mbs, "rew_inf_greedy"),
            **common,
        ),
    ]
    train_in = [*GEN_KEYS, "rewards", "greedy_rewards"]
    if use_ref:
        calls.insert(
            2,
            MFC(
                "ref_inf", "ref", "inference", SEQ_KEYS, ("ref_logp",), n_mbs=mbs(n_mbs, "ref_inf"), **common
            ),
        )
        train_in.append("ref_logp")
    calls.append(
        MFC("actor_train", "actor", "train", tuple(train_in), (), n_mbs=mbs(n_mbs, "actor_train"), **common)
    )
    return finish(calls, PPO_SOURCES, "remax", n_mbs)
