"""GRPOModule and ReMaxModule under RealStrategy on 4 CPU processes (gloo), tiny random llama.

Each algorithm: one iteration under a plan with reallocation leaves the same actor weights as
under the symmetric plan (samples are seeded per row, batch statistics are taken over the
global batch), and the metrics the algorithm reports are there and finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_real.algorithms.grpo import GRPOConfig
from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.grpo import GRPOModule
from lightning_real.modules.remax import ReMaxModule
from tests.rlhf_fit import fit

# eps = 1e-6: AdamW's first step would otherwise turn the rounding noise of near-zero gradients
# into lr-sized moves (the layouts sum in different orders).
OPTIM = OptimConfig(lr=3e-3, eps=1e-6)
GEN = GenerationConfig(max_new_tokens=8)


def _grpo() -> GRPOModule:
    return GRPOModule(
        tiny_spec("llama"),
        batch_size=8,
        group_size=4,
        generation=GEN,
        grpo=GRPOConfig(kl_coef=0.01),
        actor_optim=OPTIM,
    )


def _remax() -> ReMaxModule:
    return ReMaxModule(
        tiny_spec("llama"), batch_size=16, generation=GEN, ppo=PPOConfig(kl_coef=0.01), actor_optim=OPTIM
    )


GRPO_PLAN = {
    "actor_gen": "d4t1p1",  # 32 sequences: 8 prompts x 4 samples
    "ref_inf": "d2t1p1@2-3",
    "rew_inf": "d2t1p1@0-1",
    "actor_train": "d1t2p2",
}
REMAX_PLAN = {
    "actor_gen": "d2t1p1@0-1",
    "actor_gen_greedy": "d2t1p1@2-3",  # the two generations run at the same time
    "ref_inf": "d2t2p1",
    "rew_inf": "d2t1p1@0-1",
    "rew_inf_greedy": "d2t1p1@2-3",
    "actor_train": "d1t2p2",
}


def _same_actor(a: Path, b: Path) -> None:
    x, y = torch.load(a / "actor.pt"), torch.load(b / "actor.pt")
    assert set(x) == set(y)
    for k in x:
        # fp32, one AdamW step of lr 3e-3: the layouts differ only by summation order.
        torch.testing.assert_close(y[k], x[k], atol=2e-5, rtol=0, msg=k)


def _finite(row: dict[str, str], keys: tuple[str, ...]) -> None:
    for k in keys:
        assert row.get(k, "") != "", k
        assert math.isfinite(float(row[k])), k


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("make", "plan", "batch", "keys"),
    [
        (_grpo, GRPO_PLAN, 8, ("reward/mean", "reward/group_std", "actor/pg_loss", "actor/kl_loss")),
        (_remax, REMAX_PLAN, 16, ("reward/mean", "reward/greedy_mean", "actor/pg_loss", "actor/ref_kl")),
    ],
    ids=["grpo", "remax"],
)
def test_one_iteration_with_reallocation_equals_the_symmetric_plan(tmp_path, make, plan, batch, keys):
    rows_sym = fit(make(), "symmetric", tmp_path / "sym", steps=1, batch=batch)
    rows_real = fit(make(), plan, tmp_path / "real", steps=1, batch=batch)
    _same_actor(tmp_path / "sym", tmp_path / "real")
    for rows in (rows_sym, rows_real):
        assert len(rows) == 1
        _finite(rows[0], (*keys, "perf/throughput", "timing_s/actor_gen"))
    assert float(rows_real[0]["realloc/bytes"]) > 0  # the actor was moved to generate
    # the same samples were scored under both plans
    assert float(rows_sym[0]["reward/mean"]) == pytest.approx(float(rows_real[0]["reward/mean"]), abs=1e-6)
