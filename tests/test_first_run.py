"""What a first run shows: no known-harmless dependency warnings (and only those are filtered),
the role summary in place of Lightning's model summary, a progress bar counting iterations."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightning_real.models.spec import tiny_spec
from lightning_real.progress import IterationTQDMBar
from lightning_real.summary import _count

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import warnings
    import lightning_real  # installs the filters
    import megatron.core.optimizer  # warns at import that Transformer Engine and Apex are missing
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    text = "Apex is not installed. Falling back to Torch Norm"
    warnings.warn_explicit(text, UserWarning, "megatron_spec.py", 1, module="megatron.core.models.backends")
    warnings.warn_explicit(text, UserWarning, "other_package.py", 2, module="other_package")
    warnings.warn_explicit("a new megatron warning", UserWarning, "megatron_new.py", 3, module="megatron.core.x")
    rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    rank_zero_info("an ordinary Lightning line")
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_", "TORCHELASTIC"))}
    for k in ("RANK", "WORLD_SIZE", "NODE_RANK", "PYTHONWARNINGS"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


OPT_OUT = (
    "import warnings, lightning_real\n"
    "warnings.warn_explicit('Apex is not installed. Falling back to Torch Norm', UserWarning, 'megatron_spec.py', 1,"
    " module='megatron.core.models.backends')\n"
)


@pytest.mark.timeout(240)
def test_only_the_known_messages_are_filtered_and_only_by_their_issuer() -> None:
    run = [sys.executable, "-c", PROBE]
    err = subprocess.run(run, env=_env(), capture_output=True, text=True, timeout=230).stderr
    assert "Transformer Engine and Apex are not installed" not in err
    assert "megatron_spec.py" not in err  # the known message from megatron
    assert "other_package.py:2" in err  # the same text from anywhere else
    assert "a new megatron warning" in err  # anything else megatron says
    assert "litlogger" not in err and "an ordinary Lightning line" in err
    # A user who asks for warnings gets all of them.
    opt_out = [sys.executable, "-W", "default", "-c", OPT_OUT]
    err = subprocess.run(opt_out, env=_env(), capture_output=True, text=True, timeout=60).stderr
    assert "megatron_spec.py:1: UserWarning: Apex is not installed" in err


@pytest.mark.timeout(300)
def test_a_recipe_run_shows_the_roles_and_counts_iterations_without_dependency_warnings(
    tmp_path: Path,
) -> None:
    # tp=2 (megatron's CUDA_DEVICE_MAX_CONNECTIONS advice), a checkpoint every step (Lightning's
    # manual-optimization notice), the default Trainer summary and bar.
    cmd = [
        sys.executable,
        "-m",
        "lightning_real.cli",
        "run",
        str(ROOT / "recipes" / "tiny" / "sft.yaml"),
        "trainer.devices=2",
        "plan.actor_train=d1t2p1",
        "trainer.max_steps=3",
        f"trainer.output_dir={tmp_path / 'run'}",
        "trainer.checkpoint_every_n_steps=1",
        "export.dir=null",
        "export.roles=null",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, err = proc.stdout, proc.stderr
    for noise in ("Warning", "warnings.warn", "deprecated", "Tip:", "Total params", "Epoch 0/-2"):
        assert noise not in out + err, f"{noise!r} in the output:\n{out}\n{err}"
    params = _count(tiny_spec("llama").num_params())
    assert "SFTModule on 2 processes (gloo, 2 per node), plan of the given layouts" in out
    assert f"  actor  {params:>7}  actor_train d1t2p1@0-1 mb2 (home)" in out
    assert "predicted iteration: " in out and "(planner, cpu-gloo profile)" in out
    assert "iteration time: measured " in out and "(median of iterations 2-3), predicted " in out
    bar = [line for line in out.splitlines() if line.startswith("Iteration")]
    assert bar and " 3/3 " in bar[-1], out


def _stub_trainer(global_step: int) -> SimpleNamespace:
    return SimpleNamespace(
        max_steps=40,
        max_epochs=-1,
        global_step=global_step,
        current_epoch=1,
        num_training_batches=5,
        progress_bar_metrics={},
        loggers=[],
        is_global_zero=True,
    )


def test_the_bar_counts_iterations_across_epochs_and_from_a_resumed_step() -> None:
    bar = IterationTQDMBar()
    trainer = _stub_trainer(global_step=12)  # a resumed run, in its second epoch of 5 batches
    bar._trainer = trainer  # type: ignore[assignment]
    bar._train_progress_bar = bar.init_train_tqdm()
    bar.on_train_epoch_start(trainer)  # type: ignore[arg-type]
    tqdm = bar.train_progress_bar
    assert (tqdm.n, tqdm.total, tqdm.desc) == (12, 40, "Iteration: ")
    trainer.global_step = 13  # one iteration later, batch 0 of the epoch
    bar.on_train_batch_end(trainer, SimpleNamespace(), None, None, 0)  # type: ignore[arg-type]
    assert tqdm.n == 13
    tqdm.close()
