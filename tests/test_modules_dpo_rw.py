"""DPOModule and RewardModelModule in a real Lightning Trainer on 4 CPU processes (gloo).

Each algorithm runs under two plans that shard its models differently; the per-step losses must
agree (fp32 on CPU: the layouts only sum in different orders, so within 1e-4 as the SFT strategy
test and the training parity tests allow), and the model must learn over the few steps.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_real.algorithms.dpo import DPOConfig
from lightning_real.data.modules import PreferenceDataModule
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.dpo import DPOModule
from lightning_real.modules.rw import RewardModelModule
from lightning_real.strategy import RealStrategy

ASSETS = Path(__file__).resolve().parents[1] / "lightning_real" / "data" / "assets"
STEPS = 4
PAIRS = 8
PLAN_TOL = 1e-4


def _probe_ids() -> torch.Tensor:
    return torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))


class ExportReward(Callback):
    """At the end of training: export the reward model, and write our model's values on a probe batch."""

    def __init__(self, folder: Path, values_file: Path) -> None:
        self.folder = folder
        self.values_file = values_file

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        from lightning_real.models.forward import forward_values

        pl_module.save_hf("reward", self.folder)
        shard = pl_module.home_shard("reward")
        if shard.member:
            ids = _probe_ids()
            values = forward_values(shard, ids, torch.ones_like(ids))
            if trainer.global_rank == 0:
                torch.save(values, self.values_file)


def _fit(
    tmp_path: Path, module: object, plan: dict[str, str], name: str, callbacks: list[Callback] | None = None
) -> list[dict[str, float]]:
    """Per-step metrics of a 4-process fit (rank 0's CSV log)."""
    trainer = Trainer(
        strategy=RealStrategy(plan=plan, start_method="spawn"),
        accelerator="cpu",
        devices=4,
        max_steps=STEPS,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=callbacks or [],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    data = PreferenceDataModule(ASSETS / "preference.jsonl", batch_size=PAIRS, max_len=48)
    trainer.fit(module, datamodule=data)  # type: ignore[arg-type]
    with open(next((tmp_path / name).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if v} for r in rows]


def _series(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows if key in r]


@pytest.mark.timeout(600)
def test_dpo_under_two_plans_gives_the_same_losses_and_learns(tmp_path):
    def module() -> DPOModule:
        return DPOModule(
            tiny_spec("llama"), batch_size=PAIRS, dpo=DPOConfig(beta=0.1), optim=OptimConfig(lr=3e-3), n_mbs=2
        )

    a = _fit(tmp_path, module(), {"ref_inf": "d4t1p1", "actor_train": "d4t1p1"}, "dp4")
    b = _fit(tmp_path, module(), {"ref_inf": "d2t1p1@2-3", "actor_train": "d1t2p2"}, "tp2pp2")
    loss_a, loss_b = _series(a, "dpo/loss"), _series(b, "dpo/loss")
    assert len(loss_a) == STEPS and len(loss_b) == STEPS
    assert max(abs(x - y) for x, y in zip(loss_a, loss_b)) < PLAN_TOL
    for key in ("dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/margins", "dpo/logps/chosen"):
        assert max(abs(x - y) for x, y in zip(_series(a, key), _series(b, key))) < PLAN_TOL, key
    # Step 1: the policy is the reference, so every implicit reward is 0 and the loss is log 2.
    assert abs(loss_a[0] - math.log(2)) < 1e-4
    assert abs(_series(a, "dpo/rewards/margins")[0]) < 1e-4
    # It learns: lower loss, chosen answers ahead of rejected ones on fresh batches.
    assert loss_a[-1] < loss_a[0] - 0.05
    assert _series(a, "dpo/rewards/margins")[-1] > 0
    assert _series(a, "dpo/rewards/accuracies")[-1] > 0.5
    assert {"actor/grad_norm", "actor/lr"} <= set(a[-1])


@pytest.mark.timeout(600)
def test_reward_model_under_two_plans_gives_the_same_losses_and_learns(tmp_path):
    def module() -> RewardModelModule:
        return RewardModelModule(tiny_spec("llama"), batch_size=PAIRS, optim=OptimConfig(lr=3e-3), n_mbs=2)

    a = _fit(tmp_path, module(), {"rew_train": "d4t1p1"}, "dp4")
    export = ExportReward(tmp_path / "reward-hf", tmp_path / "values.pt")
    b = _fit(tmp_path, module(), {"rew_train": "d1t2p2"}, "tp2pp2", [export])
    loss_a, loss_b = _series(a, "rw/loss"), _series(b, "rw/loss")
    assert len(loss_a) == STEPS and len(loss_b) == STEPS
    assert max(abs(x - y) for x, y in zip(loss_a, loss_b)) < PLAN_TOL
    assert max(abs(x - y) for x, y in zip(_series(a, "rw/margin"), _series(b, "rw/margin"))) < PLAN_TOL
    acc = _series(a, "rw/accuracy")
    assert loss_a[-1] < loss_a[0]
    assert acc[-1] > acc[0]

    # The trained model exports as LlamaForSequenceClassification with our per-token values
    # (fp32; the tp2pp2 layout only sums in another order: within 1e-5 as the forward parity tests).
    import transformers

    ours = torch.load(export.values_file)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(export.folder).float().eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    ids = _probe_ids()
    with torch.no_grad():
        theirs = model.score(model.model(input_ids=ids).last_hidden_state).squeeze(-1)
        model.config.pad_token_id = 255  # not in the probe: the pooled score is the last token's
        pooled = model(input_ids=ids).logits.squeeze(-1)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert (ours[:, -1] - pooled).abs().max().item() < 1e-5
