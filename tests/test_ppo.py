"""PPOModule under RealStrategy in a real Lightning Trainer on 4 CPU processes (gloo).

Tiny random llama actor and critic, the shipped "say the letter" task with its rule reward.
Checks: the reward rises; one iteration under a plan with reallocation updates the actor and
critic as the symmetric plan does; calls on disjoint ranks overlap in time; metrics reach W&B.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_real.algorithms.ppo import PPOConfig
from lightning_real.models.generate import GenerationConfig
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.ppo import PPOModule
from tests.rlhf_fit import fit

BATCH = 32
# Every call on its own layout: the actor moves from d1t2p2 (train) to d2t2p1 (generate), the
# critic from d1t2p2 (train) to two ranks (inference); reference and reward share the others.
REALLOC_PLAN = {
    "actor_gen": "d2t2p1",
    "ref_inf": "d2t1p1@0-1",
    "rew_inf": "d2t1p1@2-3",
    "critic_inf": "d2t1p1@2-3",
    "actor_train": "d1t2p2",
    "critic_train": "d1t2p2",
}


def _module(seed: int = 0, lr: float = 3e-3, eps: float = 1e-8) -> PPOModule:
    return PPOModule(
        tiny_spec("llama"),
        batch_size=BATCH,
        generation=GenerationConfig(max_new_tokens=8),
        ppo=PPOConfig(kl_coef=0.01, minibatches=2),
        actor_optim=OptimConfig(lr=lr, eps=eps),
        critic_optim=OptimConfig(lr=2 * lr, eps=eps),
        seed=seed,
    )


def _fit(
    tmp: Path, plan: Any, steps: int, module: PPOModule | None = None, **kw: Any
) -> list[dict[str, str]]:
    return fit(module or _module(), plan, tmp, steps, BATCH, roles=("actor", "critic"), **kw)


@pytest.mark.timeout(600)
def test_reward_rises_in_bf16_mixed(tmp_path):
    # bf16 shards with fp32 masters under the same reallocation plan (moves carry bf16 bytes)
    rows = _fit(tmp_path, REALLOC_PLAN, steps=16, precision="bf16-mixed")
    rewards = [float(r["reward/mean"]) for r in rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, rewards
    # the moves carry the 2-byte working copies: exactly the plans' bytes at element size 2
    from lightning_real.layout import Layout
    from lightning_real.realloc import realloc_bytes

    def sent(head: str, dst: str) -> int:
        lay = (Layout.parse("d1t2p2").resolve(4), Layout.parse(dst).resolve(4))
        return realloc_bytes(tiny_spec("llama", head=head), *lay, element_size=2).bytes_sent

    assert float(rows[-1]["realloc/bytes"]) == sent("lm", "d2t2p1") + sent("value", "d2t1p1@2-3")


@pytest.mark.timeout(600)
def test_reward_rises_under_a_reallocation_plan(tmp_path):
    rows = _fit(tmp_path, REALLOC_PLAN, steps=16)
    rewards = [float(r["reward/mean"]) for r in rows]
    assert len(rewards) == 16
    # A random policy scores about 0.04 on this task; PPO lifts it within a dozen iterations.
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.05, rewards
    last_row = rows[-1]
    for key in (
        "actor/pg_loss",
        "actor/pg_clipfrac",
        "actor/ppo_kl",
        "actor/entropy",
        "critic/vf_loss",
        "critic/vf_explained_var",
        "response_length/mean",
        "timing_s/actor_gen",
        "timing_s/realloc",
        "perf/throughput",
    ):
        assert key in last_row and last_row[key] != "", key
        assert torch.isfinite(torch.tensor(float(last_row[key]))), key
    # both trained models were moved to their inference layouts every iteration
    assert float(last_row["realloc/bytes"]) > 0


@pytest.mark.timeout(600)
def test_one_iteration_with_reallocation_equals_the_symmetric_plan(tmp_path):
    # eps = 1e-6 keeps AdamW's first step from amplifying the rounding noise of near-zero gradients
    # into lr-sized moves (the layouts sum in different orders).
    sym, real = tmp_path / "sym", tmp_path / "real"
    _fit(sym, "symmetric", steps=1, module=_module(eps=1e-6))
    _fit(real, REALLOC_PLAN, steps=1, module=_module(eps=1e-6))
    init = _module().specs
    assert init["actor"].head == "lm" and init["critic"].head == "value"
    for role in ("actor", "critic"):
        a, b = torch.load(sym / f"{role}.pt"), torch.load(real / f"{role}.pt")
        assert set(a) == set(b)
        for k in a:
            # fp32, two AdamW steps of lr 3e-3 / 6e-3: layouts differ only by summation order.
            torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=0, msg=f"{role} {k}")
    # the iteration did train (weights moved away from the random init)
    from lightning_real.models.sharding import random_canonical

    w0 = random_canonical(init["actor"], 0)
    a = torch.load(sym / "actor.pt")
    assert any(not torch.allclose(a[k], w0[k]) for k in a if k in w0)


@pytest.mark.timeout(600)
def test_resume_continues_exactly(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def module() -> PPOModule:
        # adaptive KL and reward scaling: their state must survive the checkpoint too
        return PPOModule(
            tiny_spec("llama"),
            batch_size=BATCH,
            generation=GenerationConfig(max_new_tokens=8),
            ppo=PPOConfig(
                kl_coef=0.05, adaptive_kl=True, kl_target=1.0, kl_horizon=64, reward_scaling="scale"
            ),
            actor_optim=OptimConfig(lr=3e-3, warmup_steps=2),
            critic_optim=OptimConfig(lr=6e-3),
        )

    ck = tmp_path / "ck"
    saver = ModelCheckpoint(dirpath=ck, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    full = fit(module(), REALLOC_PLAN, tmp_path / "full", 4, BATCH, roles=(), callbacks=(saver,))
    resumed = fit(
        module(), REALLOC_PLAN, tmp_path / "resumed", 4, BATCH, roles=(), ckpt_path=str(ck / "step=2.ckpt")
    )
    assert [r["step"] for r in full] == ["0", "1", "2", "3"] and [r["step"] for r in resumed] == ["2", "3"]
    keys = (
        "reward/mean",
        "actor/kl_coef",
        "critic/score/mean",
        "actor/pg_loss",
        "critic/vf_loss",
        "actor/lr",
    )
    for a, b in zip(full[2:], resumed):
        # fp32 on CPU: the same operations on the same values give the same bits
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert full[3]["actor/kl_coef"] != full[0]["actor/kl_coef"]  # the controller did move


@pytest.mark.timeout(600)
def test_disjoint_plan_runs_calls_on_disjoint_ranks_at_the_same_time(tmp_path):
    traces = tmp_path / "traces"
    _fit(tmp_path, "disjoint", steps=3, trace_dir=str(traces))
    files = sorted(traces.glob("trace-step*.json"))
    assert len(files) == 3
    overlaps = 0
    for f in files:
        events = json.loads(f.read_text())["traceEvents"]
        spans: dict[str, list[tuple[float, float, int]]] = {}  # name -> (start, end, rank)
        for e in events:
            if e.get("ph") == "X":
                spans.setdefault(e["name"], []).append((e["ts"], e["ts"] + e["dur"], e["tid"]))
        # disjoint: ref_inf on ranks 0-1; rew_inf and critic_inf on ranks 2-3
        assert {p for *_, p in spans["ref_inf"]} == {0, 1}
        assert {p for *_, p in spans["critic_inf"]} == {2, 3}
        ref = spans["ref_inf"]
        other = spans["rew_inf"] + spans["critic_inf"]
        if any(a0 < b1 and b0 < a1 for a0, a1, _ in ref for b0, b1, _ in other):
            overlaps += 1
    assert overlaps >= 2, f"calls on disjoint ranks overlapped in {overlaps} of 3 iterations"


@pytest.mark.timeout(600)
def test_metrics_reach_wandb_offline(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from tests.wandb_records import history

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    os.environ.pop("WANDB_API_KEY", None)
    logger = WandbLogger(project="lightning-real-test", save_dir=str(tmp_path), offline=True)
    _fit(tmp_path, "symmetric", steps=2, logger=logger)
    runs = list(tmp_path.rglob("run-*.wandb"))
    assert len(runs) == 1, runs
    rows = [r for r in history(runs[0]) if "reward/mean" in r]
    assert len(rows) == 2
    for r in rows:
        for key in (
            "reward/mean",
            "actor/pg_loss",
            "critic/vf_loss",
            "timing_s/actor_gen",
            "perf/throughput",
        ):
            assert isinstance(r[key], float), (key, r)
        assert 0.0 <= r["reward/mean"] <= 1.0
