"""PPO's graph: ``actor_gen -> {ref_inf, rew_inf, critic_inf} -> {actor_train, critic_train}``."""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph, Role
from lightning_real.graphs.common import SEQ_KEYS, Microbatches, finish, mbs, rollout_keys


def ppo_graph(
    batch_size: int,
    n_mbs: Microbatches = 1,
    minibatches: int = 1,
    prompt_len: int = 128,
    gen_len: int = 128,
    with_index: bool = False,
) -> DataflowGraph:
    """PPO: ``actor_gen -> {ref_inf, rew_inf, critic_inf} -> {actor_train, critic_train}``.

    ``rew_inf`` writes ``rewards`` (one task score per sequence ``[B]``), ``ref_inf`` writes
    ``ref_logp`` and ``critic_inf`` writes ``values`` (``[B, S]`` each). Both train calls read
    everything, since each computes the KL-penalised rewards and GAE advantages itself.
    ``n_mbs`` is one count for every call or a mapping from call name to count (default 1).
    ``with_index`` carries the prompts' row numbers to ``rew_inf`` (``prompt_index``), for a
    reward that looks up each row's ground truth.
    """
    sources, gen_out, rew_in = rollout_keys(with_index)
    common: dict[str, Any] = dict(batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len)
    train_in = (*gen_out, "ref_logp", "rewards", "values")
    calls = [
        MFC("actor_gen", "actor", "generate", sources, gen_out, n_mbs=mbs(n_mbs, "actor_gen"), **common),
        MFC("ref_inf", "ref", "inference", SEQ_KEYS, ("ref_logp",), n_mbs=mbs(n_mbs, "ref_inf"), **common),
        MFC("rew_inf", "reward", "inference", rew_in, ("rewards",), n_mbs=mbs(n_mbs, "rew_inf"), **common),
        MFC(
            "critic_inf",
            "critic",
            "inference",
            SEQ_KEYS[:2],
            ("values",),
            n_mbs=mbs(n_mbs, "critic_inf"),
            **common,
        ),
    ]
    trains: tuple[tuple[str, Role], ...] = (("actor_train", "actor"), ("critic_train", "critic"))
    for name, role in trains:
        calls.append(
            MFC(
                name,
                role,
                "train",
                train_in,
                (),
                n_mbs=mbs(n_mbs, name),
                minibatches=minibatches,
                **common,
            )
        )
    return finish(calls, sources, "ppo", n_mbs)
