"""Bodies of the calls RLHF algorithms share: generate, reference log-probs, rewards and values.

Each factory returns a ``CallFn`` for the runtime: ``fn(shard, rows) -> (output rows, metrics)``,
run on every rank of the call's layout with that rank's data-parallel share of the rows. The
tensors follow the layout of ``lightning_real.dataflow`` (``seq``, ``attention_mask`` and
``loss_mask`` ``[B, S]``; log-probabilities ``[B, S - 1]``; ``values`` ``[B, S]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from lightning_real.algorithms.policy import PolicyLossConfig
from lightning_real.graphs.common import INDEX_KEY, PROMPT_INDEX_KEY
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.shard import ModelShard
from lightning_real.runtime.build import CallFn, Rows
from lightning_real.runtime.generation import Generator

RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A rule-based reward: ``(seq, attention_mask, loss_mask) -> scores [B]``."""
IndexedRewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""A rule that also reads each row's prompt row number, ``(seq, attention_mask, loss_mask,
prompt_index) -> scores [B]`` (:class:`~lightning_real.data.verifiable.VerifiableReward`); it says
so with a true ``needs_index`` attribute."""
Rule = RewardFn | IndexedRewardFn


def needs_index(rule: object) -> bool:
    """Whether a reward rule reads the prompts' row numbers (its ``needs_index`` attribute)."""
    return bool(getattr(rule, "needs_index", False))


def sample_rows(
    generator: Generator,
    shard: ModelShard,
    prompts: torch.Tensor,
    pmask: torch.Tensor,
    config: GenerationConfig,
    group_size: int,
    row_offset: int,
    index: torch.Tensor | None = None,
) -> Rows:
    """``group_size`` responses to each of ``prompts`` as the rows a generate call writes.

    ``row_offset`` is the global index of the first output row (it keys the rows' sampling
    streams). ``index`` (the prompts' row numbers) becomes ``prompt_index``, repeated per group.
    """
    if group_size > 1:
        prompts = prompts.repeat_interleave(group_size, 0)
        pmask = pmask.repeat_interleave(group_size, 0)
    b = prompts.shape[0]
    out = generator.generate(shard, prompts, pmask, config, row_offset=row_offset)
    p = out.prompt_length
    resp = out.response_mask.to(pmask.dtype)
    old = torch.zeros(b, out.tokens.shape[1] - 1, dtype=torch.float32, device=out.tokens.device)
    # entry t scores token t + 1, so response token j (at p + j) is scored at p + j - 1
    old[:, p - 1 :] = out.response_logprobs * out.response_mask
    rows = {
        "seq": out.tokens,
        "attention_mask": torch.cat([pmask.to(resp.device), resp], 1),
        "loss_mask": torch.cat([torch.zeros_like(pmask, device=resp.device), resp], 1),
        "old_logp": old,
        "no_eos": out.truncated.long(),
    }
    if index is not None:
        rows[PROMPT_INDEX_KEY] = index.long().repeat_interleave(group_size, 0).to(out.tokens.device)
    return rows


def generate_call(
    generator: Generator,
    config: GenerationConfig,
    seed_of_step: Callable[[], int],
    group_size: int = 1,
    greedy: bool = False,
    out_prefix: str = "",
    keys: tuple[str, ...] | None = None,
    with_index: bool = False,
) -> CallFn:
    """``actor_gen``: sample ``group_size`` responses per prompt.

    Writes ``seq``, ``attention_mask``, ``loss_mask`` (1 on response tokens, EOS included),
    ``old_logp`` (the sampling log-probs, 0 off the response) and ``no_eos`` (1 when the
    response hit the token limit), and with ``with_index`` the ``prompt_index`` of each row
    (from the ``index`` source key). Each row samples from its own seeded stream keyed by its
    global index (see :func:`~lightning_real.models.generate.generate`), so the samples do not
    depend on the layout. ``out_prefix`` renames the keys (ReMax's greedy baseline writes
    ``greedy_seq``...); ``keys`` keeps only those output keys (after renaming).
    """

    def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None, "the call runs on its layout's ranks, which hold the model"
        b = x["prompts"].shape[0] * group_size
        cfg = replace(config, seed=seed_of_step(), greedy=greedy or config.greedy)
        index = x[INDEX_KEY] if with_index else None
        rows = sample_rows(
            generator, shard, x["prompts"], x["prompt_mask"], cfg, group_size, shard.groups.dp_rank * b, index
        )
        out_rows = {out_prefix + k: v for k, v in rows.items()}
        if keys is not None:
            out_rows = {k: out_rows[k] for k in keys}
        # An engine with log-probs of its own (vLLM) says how far they are from the shard's.
        gap = generator.last_logprob_diff
        return out_rows, ({} if gap is None else {"actor/rollout_logprob_diff": float(gap)})

    return fn


def logprob_call(
    n_mbs: int, token_budget: int | None = None, out_key: str = "ref_logp", in_prefix: str = ""
) -> CallFn:
    """``ref_inf``: log-probabilities of the sequence's tokens, zero off the response (rows packed
    to ``token_budget`` tokens when given)."""
    from lightning_real.models.forward import forward_logprobs

    def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None, "the call runs on its layout's ranks, which hold the model"
        seq, am, lm = (x[in_prefix + k] for k in ("seq", "attention_mask", "loss_mask"))
        lp = forward_logprobs(shard, seq, am, n_mbs=n_mbs, token_budget=token_budget)
        return {out_key: lp * lm[:, 1:].to(lp.device, lp.dtype)}, {}

    return fn


def value_call(n_mbs: int, token_budget: int | None = None) -> CallFn:
    """``critic_inf``: per-token values ``[B, S]``, zero on padding."""
    from lightning_real.models.forward import forward_values

    def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None, "the call runs on its layout's ranks, which hold the model"
        v = forward_values(shard, x["seq"], x["attention_mask"], n_mbs=n_mbs, token_budget=token_budget)
        return {"values": v * x["attention_mask"].to(v.device, v.dtype)}, {}

    return fn


def score_rows(rule: Rule, rows: Rows, in_prefix: str = "", index_key: str | None = None) -> torch.Tensor:
    """``rule``'s scores ``[B]`` of generated rows (on the rows' device); ``index_key`` names the
    rows' prompt row numbers for a rule that reads them."""
    seq, am, lm = (rows[in_prefix + k].cpu() for k in ("seq", "attention_mask", "loss_mask"))
    if needs_index(rule):
        if index_key is None or index_key not in rows:
            raise ValueError(
                f"the reward rule {type(rule).__name__} reads each row's prompt_index, which the call "
                "was not given (build the graph with with_index=True)"
            )
        scores = rule(seq, am, lm, rows[index_key].cpu())  # type: ignore[call-arg]
    else:
        scores = rule(seq, am, lm)  # type: ignore[call-arg]
    return scores.float().to(rows[in_prefix + "seq"].device)


def reward_call(
    rule: Rule | None,
    n_mbs: int,
    in_prefix: str = "",
    out_key: str = "rewards",
    index_key: str | None = None,
    token_budget: int | None = None,
) -> CallFn:
    """``rew_inf``: one score per sequence, from a rule (``rule``) or a reward model (the shard).

    A reward model's score is its value-head output at the sequence's last real token. A rule
    that reads the prompts' row numbers finds them under ``index_key`` (``prompt_index``).
    """

    def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        if rule is not None:
            return {out_key: score_rows(rule, x, in_prefix, index_key)}, {}
        from lightning_real.algorithms.rw import last_token_scores
        from lightning_real.models.forward import forward_values

        assert shard is not None
        seq, am = x[in_prefix + "seq"], x[in_prefix + "attention_mask"]
        values = forward_values(shard, seq, am, n_mbs=n_mbs, token_budget=token_budget)
        return {out_key: last_token_scores(values, am)}, {}

    return fn


def gather_rows(rows: Rows, dp_group: Any, dp: int) -> Rows:
    """The global batch from every data-parallel replica's rows (replicas in order).

    Train calls compute batch statistics (advantage whitening, reward scaling, group baselines)
    over the global batch, so the result is the same under every layout.
    """
    if dp == 1:
        return dict(rows)
    out: Rows = {}
    for k in sorted(rows):
        v = rows[k].contiguous()
        parts = [torch.empty_like(v) for _ in range(dp)]
        dist.all_gather(parts, v, group=dp_group)
        out[k] = torch.cat(parts, 0)
    return out


def train_rows(full: Rows) -> Rows:
    """What every policy or value train step reads of the global batch: the tokens, their
    padding mask and the action mask (``loss_mask[:, 1:]``, the response tokens)."""
    return {
        "input_ids": full["seq"],
        "attention_mask": full["attention_mask"],
        "action_mask": full["loss_mask"][:, 1:].float(),
    }


def train_steps(
    engine: Any, rows: Rows, groups: Any, minibatches: int, epochs: int, prefix: str
) -> dict[str, float]:
    """``epochs`` passes of ``minibatches`` optimizer steps over the global batch ``rows``.

    Global minibatch i is the same rows under every data-parallel degree; each replica steps on
    its share of it. Returns the engine's metrics averaged over the steps, bare names (``loss``,
    ``grad_norm``, ``lr``) under ``prefix/``.
    """
    from lightning_real.models.train import split_for_dp, split_microbatches

    sums: dict[str, float] = {}
    steps = 0
    for _ in range(epochs):
        for mb in split_microbatches(rows, minibatches):
            for k, v in engine.step(split_for_dp(mb, groups.layout.dp, groups.dp_rank)).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            steps += 1
    return {k if "/" in k else f"{prefix}/{k}": v / steps for k, v in sums.items()}


def policy_step_loss(
    out: torch.Tensor, mb: Rows, cfg: PolicyLossConfig, tp_group: Any
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The actor loss under ``cfg`` of one microbatch, from its vocabulary-parallel logits (the
    KL loss reads ``ref_logp``, truncated importance sampling ``rollout_logp``); the entropy is
    always reported, with a graph only when weighted."""
    from lightning_real.algorithms.policy import combined_policy_loss
    from lightning_real.models.vocab_parallel import next_token_logprobs, vocab_parallel_entropy

    logits = out[:, :-1]
    logp = next_token_logprobs(out, mb["input_ids"], tp_group)
    if cfg.entropy_coef:
        entropy = vocab_parallel_entropy(logits, tp_group)
    else:
        with torch.no_grad():
            entropy = vocab_parallel_entropy(logits.detach(), tp_group)
    return combined_policy_loss(
        logp,
        mb["old_logp"],
        mb["advantages"],
        mb["action_mask"],
        cfg,
        ref_logp=mb.get("ref_logp"),
        rollout_logp=mb.get("rollout_logp"),
        entropy=entropy,
        reduction="sum",
    )
