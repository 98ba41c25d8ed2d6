"""Recipe errors blame the key at fault, and a resume takes the checkpoint an interrupted save left.

* microbatches and minibatches that do not fit name ``n_mbs`` and ``ppo.minibatches`` /
  ``grpo.minibatches``, not the plan (a plan's own ``microbatches:`` still names the plan);
* a prompt over the length limit names ``data.max_prompt_len`` and ``data.truncation`` and prints
  nothing from transformers; rows cut to the limit are counted;
* ``trainer.resume_from=.../last.ckpt`` is accepted when only ``last.ckpt.old`` is left, and a
  missing one names the newest complete checkpoint beside it.

Every case goes through the command line (``--check``: everything is built and checked, no
process is launched, nothing is written).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from lightning_real.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny"
PROMPTS = ROOT / "lightning_real" / "data" / "assets" / "prompts.jsonl"


def _run(capfd: pytest.CaptureFixture[str], recipe: str, *overrides: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``lightning-real run --check``, at the file descriptors
    (transformers' logger writes to the stderr it found at import)."""
    code = cli_main(["run", "--check", str(TINY / recipe), *overrides])
    out, err = capfd.readouterr()
    return code, out, err


def _error(capfd: pytest.CaptureFixture[str], recipe: str, *overrides: str) -> str:
    """The one line a failing check prints."""
    code, _, err = _run(capfd, recipe, *overrides)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lightning-real run: error: ")
    return lines[0]


# ---- keys at fault -------------------------------------------------------------------------------
def test_too_many_microbatches_name_n_mbs(capfd: pytest.CaptureFixture[str]) -> None:
    msg = _error(capfd, "ppo.yaml", "n_mbs=16")
    assert "key 'n_mbs': call actor_gen (d2t1p1@0-1): 16 microbatches exceed the 4 sequences" in msg
    msg = _error(capfd, "ppo.yaml", "n_mbs.actor_train=16")
    assert "key 'n_mbs.actor_train': call actor_train" in msg


def test_minibatches_that_do_not_split_name_the_algorithm_section(capfd: pytest.CaptureFixture[str]) -> None:
    msg = _error(capfd, "ppo.yaml", "ppo.minibatches=3")
    assert "key 'ppo.minibatches': call actor_train (d2t1p1@0-1): 4 sequences per replica" in msg
    assert "do not split into 3 minibatches" in msg
    msg = _error(capfd, "grpo.yaml", "grpo.minibatches=3")
    assert "key 'grpo.minibatches': call actor_train" in msg


def test_microbatches_a_plan_file_sets_name_the_plan(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "layouts: {actor_train: d4t1p1}\nmicrobatches: {actor_train: 8}\n"  # 8 rows / dp 4 = 2 per replica
    )
    msg = _error(capfd, "sft.yaml", f"plan={plan}")
    assert "key 'plan': call actor_train (d4t1p1@0-3): 8 microbatches exceed the 2 sequences" in msg


def test_a_rejected_long_prompt_names_the_length_keys(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rows = tmp_path / "long.jsonl"
    rows.write_text(json.dumps({"prompt": "a" * 3000}) + "\n")  # longer than the tokenizer's 2048, too
    msg = _error(capfd, "ppo.yaml", f"data.train={rows}", "data.truncation=reject", "data.batch_size=1")
    assert f"key 'data.max_prompt_len': {rows}: no rows left: all 1 rows are longer than" in msg
    assert "data.max_prompt_len=24 tokens and data.truncation='reject' drops them" in msg


def test_rows_cut_to_the_limit_are_counted(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rows = tmp_path / "mixed.jsonl"
    good = PROMPTS.read_text().splitlines()[:11]
    rows.write_text("\n".join([*good, json.dumps({"prompt": "b" * 3000})]) + "\n")
    code, out, err = _run(capfd, "ppo.yaml", f"data.train={rows}", "data.batch_size=4", "plan=symmetric")
    assert code == 0, err
    assert "1 of 12 rows are longer than max_prompt_len=24 tokens: 1 cut (truncation='left')" in out + err
    assert "Token indices sequence length" not in out + err
    assert "ppo, plan symmetric, 12 training rows" in out


# ---- resume --------------------------------------------------------------------------------------
def _fake_checkpoint(folder: Path, age_s: float = 0.0) -> None:
    """A folder that looks complete to the checks (they read no shard)."""
    folder.mkdir(parents=True)
    (folder / "meta.pt").write_bytes(b"")
    t = time.time() - age_s
    os.utime(folder / "meta.pt", (t, t))


def test_resume_from_a_last_checkpoint_an_interrupted_save_left_as_old(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _fake_checkpoint(tmp_path / "last.ckpt.old")
    code, out, err = _run(capfd, "sft.yaml", f"trainer.resume_from={tmp_path / 'last.ckpt'}")
    assert code == 0, err
    assert "ok (sft" in out


def test_resume_from_a_missing_checkpoint_names_the_newest_complete_one(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _fake_checkpoint(tmp_path / "step000001.ckpt", age_s=20)
    _fake_checkpoint(tmp_path / "step000002.ckpt", age_s=10)
    (tmp_path / "step000003.ckpt.tmp").mkdir()  # a save that never finished
    (tmp_path / "step000003.ckpt.tmp" / "meta.pt").write_bytes(b"")
    last = tmp_path / "last.ckpt"
    msg = _error(capfd, "sft.yaml", f"trainer.resume_from={last}")
    newest = tmp_path / "step000002.ckpt"
    assert msg.endswith(
        f"key 'trainer.resume_from': checkpoint '{last}' does not exist; the newest complete checkpoint "
        f"beside it is '{newest}': pass trainer.resume_from={newest}"
    )
    # a folder without meta.pt (a save killed before it published) gets the same hint
    (tmp_path / "last.ckpt").mkdir()
    msg = _error(capfd, "sft.yaml", f"trainer.resume_from={last}")
    assert "has no meta.pt (expected a checkpoint folder written by a recipe run); the newest" in msg
