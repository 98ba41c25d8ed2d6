"""Checkpoints of RealStrategy in a real Lightning Trainer on 4 CPU processes (gloo), with SFTModule.

* resume: a run that saved at step 2 and died, resumed with ``fit(ckpt_path=...)``, logs the same
  step numbers and losses for steps 3 and 4 as an uninterrupted run. Everything that steers a
  step is restored: parameters and AdamW state of every shard, the learning-rate schedule's step
  (warm-up and cosine decay make each step's rate differ), the global step, the position in the
  epoch (the epoch is cut to 3 batches, so the resumed run finishes epoch 0 mid-way and starts
  epoch 1) and the RNG states. In fp32 on CPU the same operations on the same values give the
  same bits, so the losses must be equal exactly.
* a crash while writing: at step 4, after ``step=4.ckpt``, one rank fails part-way through
  overwriting ``last.ckpt``; every rank raises, ``last.ckpt`` is still the complete step-2
  checkpoint (the resume above loads it) and no partial folder is left under a checkpoint's name.
* resume elsewhere: the uninterrupted run's step-2 checkpoint (d1t2p2 on 4 processes) resumed
  under another plan on 4 processes (d2t1p1 on ranks 2-3) and on 2 processes (d2t1p1): models
  and AdamW states are reassembled in canonical coordinates and resliced (ZeRO-1 slices on the
  new layout), the data position carries, the random states only to the same world size (they
  are per rank; one line says which).
  Steps 3 and 4 (the latter also reads the restored Adam moments and schedule step) must give
  the losses of a run that never stopped, under the new plan from the same initial weights,
  within 1e-5 relative: fp32, the layouts only sum in different orders (measured: equal at
  the logged float32 precision).
* export: ``save_hf("actor", folder)`` after fit loads with transformers, whose logits equal our
  sharded model's within 1e-5 (fp32; the layouts only sum in a different order, ~1e-6).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from lightning_real.data.modules import SFTDataModule
from lightning_real.models.optim import OptimConfig
from lightning_real.models.spec import tiny_spec
from lightning_real.modules.sft import SFTModule
from lightning_real.strategy import RealStrategy

ASSETS = Path(__file__).resolve().parents[1] / "lightning_real" / "data" / "assets"
PLAN = {"actor_train": "d1t2p2"}
NEW_PLAN = {"actor_train": "d2t1p1"}
NEW_PLAN_ON_4 = {"actor_train": "d2t1p1@2-3"}
LOGITS_ATOL = 1e-5
RESLICED_RTOL = 1e-5


def _probe_ids() -> torch.Tensor:
    return torch.randint(
        0, tiny_spec("llama").vocab_size, (2, 12), generator=torch.Generator().manual_seed(1)
    )


class ExportActor(Callback):
    """At the end of training: export the actor, and write our model's logits on a probe batch."""

    def __init__(self, folder: Path, logits_file: Path) -> None:
        self.folder = folder
        self.logits_file = logits_file

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        from lightning_real.models.forward import forward_logits

        pl_module.save_hf("actor", self.folder)
        shard = pl_module.home_shard("actor")
        if shard.member:
            ids = _probe_ids()
            logits = forward_logits(shard, ids, torch.ones_like(ids))
            if trainer.global_rank == 0:
                torch.save(logits, self.logits_file)


class FailFourthSave(Callback):
    """Rank 1's fourth checkpoint write dies part-way through, as on a full disk.

    Every 2 steps ModelCheckpoint writes ``step=N.ckpt``, then ``last.ckpt``: the fourth write
    replaces the existing ``last.ckpt`` at step 4.
    """

    def __init__(self) -> None:
        self.saves = 0

    def on_save_checkpoint(self, trainer: Trainer, pl_module: Any, checkpoint: dict) -> None:
        self.saves += 1
        if self.saves == 4 and trainer.global_rank == 1:

            def broken_save(obj: object, f: Any, *args: Any, **kwargs: Any) -> None:
                f.write(b"half a shard")
                raise OSError(28, "No space left on device")

            torch.save = broken_save  # this worker process only; it ends with the failed fit


def _fit(
    tmp_path: Path,
    name: str,
    callbacks: list[Callback],
    ckpt_path: Path | None = None,
    plan: dict[str, str] = PLAN,
    devices: int = 4,
) -> list[tuple[int, float]]:
    """(logged step, SFT loss) of each step of a fit (4 processes unless told), checkpointing
    every 2 steps."""
    trainer = Trainer(
        strategy=RealStrategy(plan=plan, start_method="spawn"),
        accelerator="cpu",
        devices=devices,
        max_steps=4,
        limit_train_batches=3,
        logger=CSVLogger(tmp_path, name=name),
        callbacks=[
            *callbacks,
            ModelCheckpoint(
                dirpath=tmp_path / f"{name}-ckpt",
                filename="{step}",
                every_n_train_steps=2,
                save_top_k=-1,
                save_last=True,
            ),
        ],
        enable_model_summary=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
    )
    module = SFTModule(
        tiny_spec("llama"), batch_size=8, n_mbs=2, optim=OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=4)
    )
    data = SFTDataModule(ASSETS / "sft.jsonl", batch_size=8, max_len=48)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    with open(next((tmp_path / name).rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    return [(int(r["step"]), float(r["actor/sft_loss"])) for r in rows if r.get("actor/sft_loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    export = ExportActor(tmp / "actor-hf", tmp / "logits.pt")
    return {"losses": _fit(tmp, "full", [export]), "tmp": tmp, "export": export}


@pytest.mark.timeout(600)
def test_crash_during_save_keeps_the_last_checkpoint_and_resume_continues_exactly(tmp_path, uninterrupted):
    full = uninterrupted["losses"]
    assert len(full) == 4 and full[-1][1] < full[0][1]
    ckpts = tmp_path / "crash-ckpt"
    with pytest.raises(Exception, match="No space left on device"):
        _fit(tmp_path, "crash", [FailFourthSave()])
    # No half-written folder is left (every rank learnt of the failure; rank 0 removed its '.tmp').
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step=2.ckpt", "step=4.ckpt"]
    shards = ["meta.pt"] + [f"shard-rank{r}.pt" for r in range(4)]
    for name in ("last.ckpt", "step=2.ckpt", "step=4.ckpt"):
        assert sorted(p.name for p in (ckpts / name).iterdir()) == shards
    good = ckpts / "last.ckpt"  # the failed overwrite left the step-2 checkpoint in place
    assert torch.load(good / "meta.pt", weights_only=False)["global_step"] == 2

    resumed = _fit(tmp_path, "resumed", [], ckpt_path=good)
    assert [s for s, _ in resumed] == [s for s, _ in full[2:]]
    # Exact: the same bits in, the same operations (see the module docstring).
    assert [loss for _, loss in resumed] == [loss for _, loss in full[2:]]
    assert sorted(p.name for p in (tmp_path / "resumed-ckpt").iterdir()) == ["last.ckpt", "step=4.ckpt"]


@pytest.fixture(scope="module")
def never_stopped_under_the_new_plan(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[int, float]]:
    # d2t1p1 computes the same on 2 processes as on ranks 2-3 of 4: one reference serves both.
    return _fit(tmp_path_factory.mktemp("new-plan"), "new", [], plan=NEW_PLAN, devices=2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "plan,devices", [(NEW_PLAN_ON_4, 4), (NEW_PLAN, 2)], ids=["d1t2p2-to-d2t1p1-on-4", "4-to-2-processes"]
)
def test_resume_under_another_plan_or_world_size_continues_as_if_never_stopped(
    tmp_path, capfd, uninterrupted, never_stopped_under_the_new_plan, plan, devices
):
    saved = uninterrupted["tmp"] / "full-ckpt" / "step=2.ckpt"
    resumed = _fit(tmp_path, "elsewhere", [], ckpt_path=saved, plan=plan, devices=devices)
    reference = never_stopped_under_the_new_plan
    assert len(resumed) == 2 and [s for s, _ in resumed] == [s for s, _ in reference[2:]]
    for (_, got), (_, want), (_, old) in zip(resumed, reference[2:], uninterrupted["losses"][2:]):
        assert got == pytest.approx(want, rel=RESLICED_RTOL)
        assert got == pytest.approx(old, rel=RESLICED_RTOL)  # and the old plan's own steps
    # the steps differ by far more than the tolerance: each loss checks the state it started from
    assert abs(resumed[0][1] - resumed[1][1]) > 100 * RESLICED_RTOL * resumed[0][1]
    out = capfd.readouterr()
    log = out.out + out.err
    worst = max(abs(g - w) / abs(w) for (_, g), (_, w) in zip(resumed, reference[2:]))
    print(f"resumed vs never stopped under the new plan: worst relative difference {worst:.1e}")
    assert "models and optimizer states resliced" in log
    rng = "random states restored per rank" if devices == 4 else "random states not restored"
    assert rng in log


@pytest.mark.timeout(600)
def test_exported_actor_loads_in_transformers_with_equal_logits(uninterrupted):
    import transformers

    export: ExportActor = uninterrupted["export"]
    ours = torch.load(export.logits_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(export.folder).float().eval()
    with torch.no_grad():
        theirs = model(input_ids=_probe_ids()).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < LOGITS_ATOL


# ---- the pieces, in one process ------------------------------------------------------------------
def test_epoch_position_loader_starts_at_the_position_and_leaves_the_rng_alone():
    from torch.utils.data import DataLoader, DistributedSampler

    from lightning_real.strategy import EpochPositionLoader

    data = list(range(20))
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=3)
    position = {"at": 0}
    loader = EpochPositionLoader(DataLoader(data, batch_size=4, sampler=sampler), lambda: position["at"])
    assert len(loader) == 5 and loader.sampler is sampler
    loader.sampler.set_epoch(1)  # what Lightning does at each epoch's start
    whole = [b.tolist() for b in loader]
    position["at"] = 2
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    rest = [b.tolist() for b in loader]
    assert rest == whole[2:]
    assert torch.equal(torch.rand(1), expected_draw)  # iterating drew nothing from the global RNG
    sampler.set_epoch(2)
    assert [b.tolist() for b in loader] != rest  # a new epoch, a new order


def test_rng_states_round_trip():
    import random

    from lightning_real.strategy import rng_states, set_rng_states

    saved = rng_states()
    first = (torch.rand(3), random.random())
    set_rng_states(saved)
    assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1]


def test_checkpoint_folder_takes_a_complete_folder_or_the_one_an_interrupted_swap_left(tmp_path):
    from lightning_real.checkpoint.sharded import checkpoint_folder
    from lightning_real.models.hf import CheckpointError

    done = tmp_path / "step=2.ckpt"
    done.mkdir()
    (done / "meta.pt").write_bytes(b"")
    assert checkpoint_folder(done) == done
    partial = tmp_path / "step=4.ckpt"
    partial.mkdir()
    (partial / "shard-rank0.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a complete"):
        checkpoint_folder(partial)
    # Between the two renames of a replacing save only '<name>.old' (the previous one) exists.
    done.rename(tmp_path / "step=2.ckpt.old")
    with pytest.warns(UserWarning, match="interrupted save"):
        assert checkpoint_folder(done) == tmp_path / "step=2.ckpt.old"
