"""Greedy evaluation of held-out prompts: the validation step of the generating modules.

Every rank takes part, as in an iteration: the actor's current parameters move to the layout of
``actor_gen`` (and a reward model to the same layout), each data-parallel replica decodes its
share of the batch's prompts greedily and scores the responses, and the sums go to every rank.
Greedy decoding makes the figure a property of the weights alone (no sampling noise), so it is
the same under every plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from lightning_real.graphs.common import PROMPT_INDEX_KEY
from lightning_real.models.generate import GenerationConfig
from lightning_real.modules.calls import Rule, needs_index, sample_rows, score_rows
from lightning_real.runtime.build import RuntimeContext

CORRECT_SCORE = 1.0
"""A response scoring at least this counts as correct in ``val/accuracy`` (exact match gives 1)."""


@dataclass(frozen=True)
class EvalSums:
    """Totals of an evaluation over held-out prompts (one response each)."""

    reward: float = 0.0
    """Sum of the responses' scores."""
    correct: float = 0.0
    """Responses scoring at least :data:`CORRECT_SCORE`."""
    count: float = 0.0
    """Responses scored."""
    length: float = 0.0
    """Sum of the responses' lengths in tokens (EOS included)."""

    def __add__(self, other: EvalSums) -> EvalSums:
        return EvalSums(
            self.reward + other.reward,
            self.correct + other.correct,
            self.count + other.count,
            self.length + other.length,
        )

    def metrics(self) -> dict[str, float]:
        """``val/reward`` (mean score), ``val/accuracy`` (share correct), ``val/response_length``."""
        n = max(self.count, 1.0)
        return {
            "val/reward": self.reward / n,
            "val/accuracy": self.correct / n,
            "val/response_length": self.length / n,
        }


def evaluate_prompts(
    ctx: RuntimeContext,
    batch: Mapping[str, torch.Tensor],
    config: GenerationConfig,
    rule: Rule | None,
    call: str = "actor_gen",
) -> EvalSums:
    """Greedy responses to ``batch``'s prompts, scored by ``rule`` (None: the reward model), summed
    over every rank (collective: every rank calls it with the same batch).

    ``batch`` holds ``prompts``, ``prompt_mask`` and, for a rule that reads them, ``index``.
    """
    layout = ctx.plan.layouts[call]
    cfg = replace(config, greedy=True, seed=0)
    local = torch.zeros(4, dtype=torch.float64)
    # Validation runs under Lightning's inference mode; moved parameters must stay normal tensors.
    with torch.inference_mode(False), torch.no_grad():
        actor, _ = ctx.pool.move("actor", layout)
        reward = ctx.pool.move("reward", layout)[0] if rule is None else None
        try:
            coords = layout.coords(ctx.rank)
            if coords is not None:
                local = _score_share(ctx, actor, reward, batch, cfg, rule, call, coords)
        finally:
            ctx.pool.release("actor", layout)
            if rule is None:
                ctx.pool.release("reward", layout)
    parts: list[list[float] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local.tolist())
    total = torch.tensor([p for p in parts if p is not None], dtype=torch.float64).sum(0)
    return EvalSums(*(float(v) for v in total))


def _score_share(
    ctx: RuntimeContext,
    actor: object,
    reward: object,
    batch: Mapping[str, torch.Tensor],
    cfg: GenerationConfig,
    rule: Rule | None,
    call: str,
    coords: tuple[int, int, int],
) -> torch.Tensor:
    """This replica's sums; only its first rank reports them (every rank of it holds the same)."""
    from lightning_real.models.shard import ModelShard

    assert isinstance(actor, ModelShard)
    dp, (d, tp, pp) = ctx.plan.layouts[call].dp, coords
    n = int(batch["prompts"].shape[0])
    # Validation batches need not split evenly (the last one is short): near-equal shares.
    lo, hi = d * n // dp, (d + 1) * n // dp
    if hi == lo:
        return torch.zeros(4, dtype=torch.float64)
    index = batch.get("index")
    rows = sample_rows(
        ctx.generator(call),
        actor,
        batch["prompts"][lo:hi],
        batch["prompt_mask"][lo:hi],
        cfg,
        1,
        lo,
        index[lo:hi] if index is not None and rule is not None and needs_index(rule) else None,
    )
    if rule is not None:
        scores = score_rows(rule, rows, index_key=PROMPT_INDEX_KEY).double().cpu()
    else:
        from lightning_real.algorithms.rw import last_token_scores
        from lightning_real.models.forward import forward_values

        assert isinstance(reward, ModelShard)
        values = forward_values(reward, rows["seq"], rows["attention_mask"])
        scores = last_token_scores(values, rows["attention_mask"]).double().cpu()
    if tp or pp:
        return torch.zeros(4, dtype=torch.float64)
    lengths = rows["loss_mask"].sum(-1).double().cpu()
    return torch.stack(
        [
            scores.sum(),
            (scores >= CORRECT_SCORE).double().sum(),
            torch.tensor(float(hi - lo), dtype=torch.float64),
            lengths.sum(),
        ]
    )
