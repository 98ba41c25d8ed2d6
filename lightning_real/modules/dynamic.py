"""DAPO's dynamic sampling inside one generate call, so the graph keeps its fixed batch size.

The data module hands the iteration ``rounds`` batches of ``prompts_per_round`` prompts. Round
``r`` samples ``group_size`` responses to each prompt of batch ``r`` (every data-parallel
replica its share), scores them with the rule, and keeps the groups whose scores are not all
equal (:func:`~lightning_real.algorithms.dapo.keep_groups`); rounds stop once
``prompts_per_round`` groups are kept. Every replica gathers each round's rows, so all of them
make the same choice and the kept groups are the same under every layout; each replica then
writes its contiguous share of them. When the rounds run out first, the batch is filled with
dropped groups, marked 0 in ``group_kept`` (the train call masks them out of the loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from lightning_real.algorithms.dapo import concat_rows, keep_groups, refill_groups
from lightning_real.graphs.common import INDEX_KEY, PROMPT_INDEX_KEY
from lightning_real.graphs.grpo import KEPT_KEY
from lightning_real.layout import row_range
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.shard import ModelShard
from lightning_real.modules.calls import Rule, gather_rows, sample_rows, score_rows
from lightning_real.runtime.build import CallFn, Rows
from lightning_real.runtime.generation import Generator


def dynamic_generate_call(
    generator: Generator,
    config: GenerationConfig,
    seed_of_step: Callable[[], int],
    group_size: int,
    prompts_per_round: int,
    rounds: int,
    rule: Rule,
    with_index: bool = False,
) -> CallFn:
    """``actor_gen`` under dynamic sampling: the generate call's keys plus ``rewards`` and
    ``group_kept`` for ``prompts_per_round * group_size`` sequences (see the module doc).

    Metrics: ``dapo/gen_rounds`` (rounds sampled), ``dapo/kept_groups`` (groups with a spread in
    the batch) and ``dapo/kept_frac`` (their share of the groups sampled).
    """
    keys = ("prompts", "prompt_mask", INDEX_KEY) if with_index else ("prompts", "prompt_mask")
    index_key = PROMPT_INDEX_KEY if with_index else None

    def fn(shard: ModelShard | None, x: Rows) -> tuple[Rows, dict[str, float]]:
        assert shard is not None, "the call runs on its layout's ranks, which hold the model"
        g = shard.groups
        dp, d = g.layout.dp, g.dp_rank
        src = gather_rows({k: x[k] for k in keys}, g.dp, dp)
        total = int(src["prompts"].shape[0])
        if total != prompts_per_round * rounds:
            raise ValueError(
                f"dynamic sampling: actor_gen got {total} prompts, expected {prompts_per_round} x "
                f"{rounds} rounds; set the data module's batch size to {prompts_per_round * rounds}"
            )
        cfg = replace(config, seed=seed_of_step())
        lo, hi = row_range(prompts_per_round, dp, d)
        kept: Rows | None = None
        dropped: Rows | None = None
        used = 0
        for r in range(rounds):
            base = r * prompts_per_round
            mine = {k: v[base + lo : base + hi] for k, v in src.items()}
            rows = sample_rows(
                generator,
                shard,
                mine["prompts"],
                mine["prompt_mask"],
                cfg,
                group_size,
                (base + lo) * group_size,  # rows of every round have their own sampling streams
                mine.get(INDEX_KEY),
            )
            rows["rewards"] = score_rows(rule, rows, index_key=index_key)
            everyone = gather_rows(rows, g.dp, dp)
            keep = keep_groups(everyone["rewards"], group_size)
            kept, full = refill_groups(kept, everyone, keep, group_size, prompts_per_round)
            dropped, _ = refill_groups(dropped, everyone, ~keep, group_size, prompts_per_round)
            used = r + 1
            if full:
                break
        assert kept is not None and dropped is not None
        n_kept = int(kept["rewards"].shape[0])
        need = prompts_per_round * group_size - n_kept
        flags = torch.zeros(prompts_per_round * group_size, dtype=torch.long, device=kept["rewards"].device)
        flags[:n_kept] = 1
        batch = kept if need == 0 else concat_rows([kept, {k: v[:need] for k, v in dropped.items()}])
        batch[KEPT_KEY] = flags
        out = {k: v[lo * group_size : hi * group_size] for k, v in batch.items()}
        metrics = {
            "dapo/gen_rounds": float(used),
            "dapo/kept_groups": float(n_kept // group_size),
            "dapo/kept_frac": n_kept / (used * prompts_per_round * group_size),
        }
        return out, metrics

    return fn
