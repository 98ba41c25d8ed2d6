"""ReMax's graph: a sampled and a greedy generation of the same prompts, both scored."""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.graphs.common import PROMPT_INDEX_KEY, SEQ_KEYS, Microbatches, finish, mbs, rollout_keys

GREEDY_KEYS: tuple[str, ...] = ("greedy_seq", "greedy_attention_mask", "greedy_loss_mask")
"""What the greedy generation writes (the sequence keys, prefixed)."""


def remax_graph(
    batch_size: int,
    n_mbs: Microbatches = 1,
    use_ref: bool = True,
    prompt_len: int = 128,
    gen_len: int = 128,
    with_index: bool = False,
) -> DataflowGraph:
    """ReMax: a sampled and a greedy generation of the same prompts, both scored; the greedy
    response's reward (``greedy_rewards``) is the baseline of the sampled one's.

    ``with_index`` carries the prompts' row numbers to both reward calls (``prompt_index`` from
    ``actor_gen``: both generations read the same prompts in the same order)."""
    sources, gen_out, rew_in = rollout_keys(with_index)
    greedy_in = (*GREEDY_KEYS, PROMPT_INDEX_KEY) if with_index else GREEDY_KEYS
    common: dict[str, Any] = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len)
    calls = [
        MFC("actor_gen", "actor", "generate", sources, gen_out, n_mbs=mbs(n_mbs, "actor_gen"), **common),
        MFC(
            "actor_gen_greedy",
            "actor",
            "generate",
            sources,
            GREEDY_KEYS,
            n_mbs=mbs(n_mbs, "actor_gen_greedy"),
            greedy=True,
            **common,
        ),
        MFC("rew_inf", "reward", "inference", rew_in, ("rewards",), n_mbs=mbs(n_mbs, "rew_inf"), **common),
        MFC(
            "rew_inf_greedy",
            "reward",
            "inference",
            greedy_in,
            ("greedy_rewards",),
            n_mbs=mbs(n_mbs, "rew_inf_greedy"),
            **common,
        ),
    ]
    train_in = [*gen_out, "rewards", "greedy_rewards"]
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
    return finish(calls, sources, "remax", n_mbs)
