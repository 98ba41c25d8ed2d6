"""What the algorithms' graphs share: the batch keys they exchange and the microbatch argument.

Token keys follow ``lightning_real.models.forward``: ``seq``, ``attention_mask`` and
``loss_mask`` are ``[B, S]``; log-probabilities (``old_logp``, ``ref_logp``) are ``[B, S - 1]``
with entry ``t`` scoring token ``t + 1`` (so ``loss_mask[:, 1:]`` masks them); ``values`` are
``[B, S]`` with entry ``t`` the value after reading tokens ``0..t``; ``rewards`` and ``no_eos``
are ``[B]``.
"""

from __future__ import annotations

from collections.abc import Mapping

from lightning_real.dataflow import MFC, DataflowGraph, GraphError, Role

PPO_SOURCES: tuple[str, ...] = ("prompts", "prompt_mask")
"""Left-padded prompt ids ``[P, Lp]`` and their attention mask (1 = token)."""
INDEX_KEY = "index"
"""Source key of a prompt's row number in its data file ``[P]``, read when the reward looks up
each row's ground truth (verifiable rewards)."""
PROMPT_INDEX_KEY = "prompt_index"
"""What a generate call writes from ``index``: each sequence's prompt row number ``[B]`` (a
group's responses repeat it), so the rows carry their ground truth's key under any layout."""
GEN_KEYS: tuple[str, ...] = ("seq", "attention_mask", "loss_mask", "old_logp", "no_eos")
"""What a generate call writes: prompt + response ids ``[B, S]`` (prompts left padded, responses
right padded), their attention mask, 1 on generated tokens (EOS included) ``[B, S]``, the actor's
log-probability of each next token ``[B, S - 1]``, and 1 per row whose response ran to the token
limit without EOS ``[B]``."""
SEQ_KEYS: tuple[str, ...] = ("seq", "attention_mask", "loss_mask")
"""The sequences an inference call scores."""
SFT_SOURCES: tuple[str, ...] = ("input_ids", "attention_mask", "loss_mask")
"""Prompt + response ids ``[B, S]``, attention mask, and 1 on response tokens."""
PAIR_SOURCES: tuple[str, ...] = (
    "chosen_ids",
    "chosen_attention_mask",
    "chosen_loss_mask",
    "rejected_ids",
    "rejected_attention_mask",
    "rejected_loss_mask",
)
"""Both answers of a preference pair, as SFT_SOURCES each."""

Microbatches = int | Mapping[str, int]
"""Microbatches per data-parallel replica: one count for every call, or call name -> count."""


def rollout_keys(with_index: bool) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """``(sources, generate outputs, reward inputs)`` of a generating algorithm; with
    ``with_index`` the prompt row numbers go from the source through generation to the reward."""
    if not with_index:
        return PPO_SOURCES, GEN_KEYS, SEQ_KEYS
    return (*PPO_SOURCES, INDEX_KEY), (*GEN_KEYS, PROMPT_INDEX_KEY), (*SEQ_KEYS, PROMPT_INDEX_KEY)


def mbs(n_mbs: Microbatches, call: str) -> int:
    """The count ``n_mbs`` gives ``call`` (1 when a mapping leaves it out)."""
    if isinstance(n_mbs, Mapping):
        return int(n_mbs.get(call, 1))
    return n_mbs


def finish(calls: list[MFC], sources: tuple[str, ...], name: str, n_mbs: Microbatches) -> DataflowGraph:
    """The graph of ``calls``, after checking that ``n_mbs`` names only its calls."""
    if isinstance(n_mbs, Mapping):
        unknown = sorted(set(n_mbs) - {c.name for c in calls})
        if unknown:
            raise GraphError(
                f"{name}_graph: n_mbs names unknown calls {unknown}; calls: {', '.join(c.name for c in calls)}"
            )
    return DataflowGraph(calls, sources, name=name)


def train_only_graph(
    name: str, call: str, role: Role, sources: tuple[str, ...], batch_size: int, n_mbs: int, seq_len: int
) -> DataflowGraph:
    """A graph of one training call that reads only source keys (SFT, reward modelling)."""
    mfc = MFC(
        call, role, "train", sources, (), batch_size=batch_size, n_mbs=n_mbs, prompt_len=seq_len, gen_len=0
    )
    return DataflowGraph([mfc], sources, name=name)
