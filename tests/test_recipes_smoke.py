"""Each tiny recipe trains a few steps through ``lightning-real run``'s code path on 2 gloo
processes (GRPO's family on one, their multi-process runs are tests/test_grpo_family.py), logs
finite metrics and exports HF folders that transformers loads; the command line also runs as a
subprocess and under torchrun; the arithmetic recipe logs its held-out accuracy."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lightning_real.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
BIN = Path(sys.executable).parent

# The tiny recipes are written for 4 processes; these plans fit the 2 used here.
TWO_DEVICES: dict[str, list[str]] = {
    "sft": ["plan.actor_train=d1t2p1"],
    "rw": ["plan.rew_train=d2t1p1"],
    "dpo": ["plan.ref_inf=d1t1p1@1", "plan.actor_train=d1t1p1@0"],
    "ppo": ["plan=disjoint"],
    "grpo": ["plan=symmetric"],
    "remax": ["plan=symmetric"],
}
METRICS: dict[str, tuple[str, ...]] = {
    "sft": ("actor/sft_loss", "actor/grad_norm"),
    "rw": ("rw/loss", "rw/accuracy"),
    "dpo": ("dpo/loss", "dpo/rewards/accuracies"),
    "ppo": ("actor/pg_loss", "critic/vf_loss", "reward/mean"),
    "grpo": ("reward/mean", "actor/grad_norm"),
    "remax": ("reward/mean", "actor/grad_norm"),
    "rloo": ("reward/mean", "reward/group_std", "actor/pg_loss", "actor/kl_loss"),
    "reinforce_pp": ("reward/mean", "actor/ref_kl", "actor/pg_loss"),
    "reinforce_pp_baseline": ("reward/mean", "actor/ref_kl", "reward/group_std"),
    "gspo": ("reward/mean", "actor/pg_clipfrac", "actor/tis_weight_mean"),
    "dapo": ("reward/mean", "dapo/kept_groups", "dapo/gen_rounds", "reward/overlong_penalty"),
    "dr_grpo": ("reward/mean", "actor/pg_loss", "actor/grad_norm"),
}
"""Keys each algorithm's metrics file must have (besides the iteration time)."""
FAMILY: tuple[str, ...] = ("rloo", "reinforce_pp", "reinforce_pp_baseline", "gspo", "dapo", "dr_grpo")
"""GRPO's family: each tiny recipe runs here on one process."""
EXPORTS: dict[str, dict[str, str]] = {
    "sft": {"actor": "AutoModelForCausalLM"},
    "rw": {"reward": "AutoModelForSequenceClassification"},
    "dpo": {"actor": "AutoModelForCausalLM"},
    "ppo": {"actor": "AutoModelForCausalLM", "critic": "AutoModelForSequenceClassification"},
    "grpo": {"actor": "AutoModelForCausalLM"},
    "remax": {"actor": "AutoModelForCausalLM"},
    **{name: {"actor": "AutoModelForCausalLM"} for name in FAMILY},
}
"""Folders each tiny recipe exports, and the transformers class that loads them."""
STEPS = 2


@pytest.fixture(autouse=True)
def _restore_environment() -> Iterator[None]:
    # Lightning's launcher sets MASTER_PORT and friends in this process; later runs pick their own.
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _overrides(algo: str, out: Path) -> list[str]:
    return [
        "trainer.devices=2",
        f"trainer.max_steps={STEPS}",
        "trainer.progress_bar=false",
        f"trainer.output_dir={out}",
        f"export.dir={out / 'export'}",
        *TWO_DEVICES[algo],
    ]


def _check_run(algo: str, out: Path) -> None:
    """Metrics file with the algorithm's keys, finite, one row per step; exports load."""
    files = list((out / "logs").rglob("metrics.csv"))
    assert len(files) == 1
    with open(files[0]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("timing_s/iteration")]
    assert len(rows) == STEPS
    for key in (*METRICS[algo], "timing_s/iteration"):
        assert key in rows[0], f"{key} not in {sorted(rows[0])}"
        values = [float(r[key]) for r in rows]
        assert all(math.isfinite(v) for v in values), (key, values)
    assert (out / "recipe.yaml").is_file()

    import transformers

    for role, cls in EXPORTS[algo].items():
        folder = out / "export" / role
        model = getattr(transformers, cls).from_pretrained(folder)
        tok = transformers.AutoTokenizer.from_pretrained(folder)
        assert model.config.vocab_size >= len(tok)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("algo", list(TWO_DEVICES))
def test_tiny_recipe_trains_and_exports(algo: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert cli_main(["run", str(TINY / f"{algo}.yaml"), *_overrides(algo, out)]) == 0
    _check_run(algo, out)


def _run_in_one_process(rank: int, world: int, runs: list[tuple[str, list[str]]]) -> list[int]:
    # One fresh process for every run: the family's recipes share its start-up, and the test
    # process keeps no process group of theirs.
    return [cli_main(["run", recipe, *over]) for recipe, over in runs]


@pytest.mark.timeout(600)
def test_family_tiny_recipes_train_and_export(tmp_path: Path) -> None:
    from lightning_real.distributed.launch import spawn

    one = ["trainer.devices=1", "trainer.start_method=popen", "plan=symmetric"]
    runs = [(str(TINY / f"{a}.yaml"), [*_overrides("grpo", tmp_path / a), *one]) for a in FAMILY]
    assert spawn(_run_in_one_process, 1, runs, timeout_s=600)[0] == [0] * len(FAMILY)
    for algo in FAMILY:
        _check_run(algo, tmp_path / algo)


@pytest.mark.timeout(300)
def test_arithmetic_recipe_logs_held_out_accuracy(tmp_path: Path) -> None:
    from lightning_real.data.arithmetic import write_arithmetic

    files = write_arithmetic(tmp_path / "data", max_operand=9, eval_rows=6, sft_rows=8)
    out = tmp_path / "run"
    over = [
        "actor.path=null",
        "actor.tiny=llama",  # a random model stands in for the SFT warm start
        "data.tokenizer=null",
        f"data.train={files['train']}",
        f"data.val={files['eval']}",
        "data.batch_size=4",
        "grpo.group_size=2",
        f"trainer.max_steps={STEPS}",
        "trainer.val_every_n_steps=1",
        f"trainer.output_dir={out}",
        "export.dir=null",
    ]
    assert cli_main(["run", str(ROOT / "recipes" / "arithmetic" / "grpo.yaml"), *over]) == 0
    with open(next((out / "logs").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r.get("timing_s/iteration")]
    assert len(train) == STEPS
    for key in ("reward/mean", "actor/pg_loss", "actor/grad_norm"):
        assert all(math.isfinite(float(r[key])) for r in train), key
    val = {int(float(r["val/step"])): float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")}
    # before training (val_before_training) and after each step, on both processes
    assert sorted(val) == list(range(STEPS + 1))
    assert all(0.0 <= v <= 1.0 for v in val.values())


@pytest.mark.timeout(300)
def test_checkpoint_then_resume(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    over = [o for o in _overrides("sft", first) if not o.startswith("trainer.max_steps")]
    args = ["run", str(TINY / "sft.yaml"), *over, "export.dir=null", "trainer.checkpoint_every_n_steps=1"]
    assert cli_main([*args, "trainer.max_steps=1"]) == 0
    ckpt = first / "checkpoints" / "last.ckpt"
    assert (ckpt / "meta.pt").is_file() and len(list(ckpt.glob("shard-rank*.pt"))) == 2
    resume = [*args, f"trainer.output_dir={second}", "trainer.max_steps=2", f"trainer.resume_from={ckpt}"]
    assert cli_main(resume) == 0
    with open(next((second / "logs").rglob("metrics.csv"))) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("actor/sft_loss")]
    assert steps == [1]  # the run went on from step 1, not from 0


def _subprocess(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_", "TORCHELASTIC"))}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("NODE_RANK", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=280)


@pytest.mark.timeout(300)
def test_command_line_runs_a_recipe(tmp_path: Path) -> None:
    # As a console script, Lightning starts rank 1 by re-running this command line.
    out = tmp_path / "run"
    cmd = [str(BIN / "lightning-real"), "run", str(TINY / "sft.yaml"), *_overrides("sft", out)]
    proc = _subprocess(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_run("sft", out)


@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_torchrun_runs_a_recipe(tmp_path: Path) -> None:
    # The recipe says trainer.devices: 4; the run takes torchrun's 2 processes and says so.
    out = tmp_path / "run"
    over = [o for o in _overrides("sft", out) if not o.startswith("trainer.devices")]
    cmd = [
        str(BIN / "torchrun"),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "lightning_real.recipes.run",
        str(TINY / "sft.yaml"),
        *over,
    ]
    proc = _subprocess(cmd, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainer.devices=4 from the recipe gives way to torchrun's --nproc-per-node 2" in proc.stderr
    _check_run("sft", out)
