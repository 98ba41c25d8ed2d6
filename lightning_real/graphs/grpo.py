"""GRPO's graph: ``actor_gen`` samples ``group_size`` responses per prompt; no critic.

The algorithms that share GRPO's module (RLOO, REINFORCE++, GSPO, DAPO, Dr. GRPO) run the same
graph with three options: the prompt row numbers for a verifiable reward (``with_index``), a
forward of the training actor for truncated importance sampling (``actor_logp``), and DAPO's
dynamic sampling, which scores inside ``actor_gen`` (``dynamic_sampling``).
"""

from __future__ import annotations

from typing import Any

from lightning_real.dataflow import MFC, DataflowGraph
from lightning_real.graphs.common import SEQ_KEYS, Microbatches, finish, mbs, rollout_keys

ACTOR_LOGP_KEY = "actor_logp"
"""The training actor's log-probs of the sampled tokens ``[B, S - 1]`` (``actor_inf``), which
truncated importance sampling compares with the rollout engine's ``old_logp``."""
KEPT_KEY = "group_kept"
"""1 per sequence of a group that dynamic sampling kept, 0 for the filler groups of an
iteration whose rounds ran out ``[B]``."""


def grpo_graph(
    batch_size: int,
    group_size: int,
    n_mbs: Microbatches = 1,
    minibatches: int = 1,
    use_ref: bool = True,
    prompt_len: int = 128,
    gen_len: int = 128,
    with_index: bool = False,
    actor_logp: bool = False,
    dynamic_sampling: bool = False,
) -> DataflowGraph:
    """GRPO: no critic; ``actor_gen`` samples ``group_size`` responses per prompt.

    ``batch_size`` counts sequences (prompts x group_size). Without ``use_ref`` (no KL term) the
    reference call is left out. ``with_index`` adds the ``index`` source key, which ``actor_gen``
    turns into ``prompt_index`` for the reward. ``actor_logp`` adds ``actor_inf`` (the actor's
    log-probs of the samples, for truncated importance sampling). With ``dynamic_sampling``,
    ``actor_gen`` also scores (a rule reward) and writes ``rewards`` and ``group_kept``, and there
    is no ``rew_inf``.
    """
    sources, gen_out, rew_in = rollout_keys(with_index)
    common: dict[str, Any] = dict(
        batch_size=batch_size, prompt_len=prompt_len, gen_len=gen_len, group_size=group_size
    )
    if dynamic_sampling:
        gen_out = (*gen_out, "rewards", KEPT_KEY)
    calls = [MFC("actor_gen", "actor", "generate", sources, gen_out, n_mbs=mbs(n_mbs, "actor_gen"), **common)]
    train_in = [*gen_out] if dynamic_sampling else [*gen_out, "rewards"]
    if use_ref:
        calls.append(
            MFC("ref_inf", "ref", "inference", SEQ_KEYS, ("ref_logp",), n_mbs=mbs(n_mbs, "ref_inf"), **common)
        )
        train_in.append("ref_logp")
    if not dynamic_sampling:
        calls.append(
            MFC("rew_inf", "reward", "inference", rew_in, ("rewards",), n_mbs=mbs(n_mbs, "rew_inf"), **common)
        )
    if actor_logp:
        calls.append(
            MFC(
                "actor_inf",
                "actor",
                "inference",
                SEQ_KEYS,
                (ACTOR_LOGP_KEY,),
                n_mbs=mbs(n_mbs, "actor_inf"),
                **common,
            )
        )
        train_in.append(ACTOR_LOGP_KEY)
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
    return finish(calls, sources, "grpo", n_mbs)
