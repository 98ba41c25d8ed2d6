"""Timeouts come from one option; a failed collective names the rank that died or did not arrive.

The whole runs (a killed or hung rank under ``lightning-real run``) are tests/test_faults.py;
these check the parts: the option and its defaults, process groups that time out after it on a
real 3-process gloo world, and the line :func:`describe_failure` writes from the status files.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_real.distributed.groups import GroupRegistry, collective_timeout
from lightning_real.distributed.launch import spawn
from lightning_real.distributed.status import (
    RankFailure,
    StatusBoard,
    describe_failure,
    exit_text,
    is_collective_failure,
    shared_folder,
)

ROOT = Path(__file__).resolve().parents[1]
GLOO_CLOSED = RuntimeError(
    "[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:4242. "
    "This is typically caused by a remote worker crashing. Check the logs of the remote worker."
)


def test_the_timeout_is_one_option_with_defaults_by_device(capsys: pytest.CaptureFixture[str]) -> None:
    # imported here: the spawned workers of the test below import this module and need neither
    from lightning_real.cli import main as cli_main
    from lightning_real.strategy import RealStrategy

    assert collective_timeout(None, "cpu") == datetime.timedelta(seconds=300)
    assert collective_timeout(None, "cuda") == datetime.timedelta(seconds=1800)
    assert collective_timeout(12, "cuda") == datetime.timedelta(seconds=12)
    with pytest.raises(ValueError, match=r"timeout_s=0; allowed: a number of seconds > 0, or None"):
        RealStrategy(timeout_s=0)
    with pytest.raises(
        ValueError, match=r"takes timeout_s \(seconds, one for every process group\), not timeout"
    ):
        RealStrategy(timeout=datetime.timedelta(seconds=5))
    assert RealStrategy(timeout_s=42).timeout_s == 42
    code = cli_main(["run", "--check", str(ROOT / "recipes/tiny/sft.yaml"), "strategy.timeout_s=-1"])
    assert code == 2
    assert "key 'strategy.timeout_s': -1.0 is not allowed; allowed: a number of seconds > 0, or null" in (
        capsys.readouterr().err
    )


def _timeout_world(rank: int, world: int) -> tuple[float, str] | None:
    """Rank 1 skips a collective on the group {0, 1}; rank 0 waits at most the registry's timeout."""
    board = StatusBoard(shared_folder(rank), rank)
    registry = GroupRegistry(timeout=datetime.timedelta(seconds=2))
    group = registry.group((0, 1))  # created by every rank, in the same order
    out = None
    if rank == 0:
        board.enter("actor_train", 3)
        start = time.time()
        try:
            dist.all_reduce(torch.ones(2), group=group)
        except RuntimeError as e:
            assert is_collective_failure(e)
            out = (time.time() - start, describe_failure(board, world, e))
    elif rank == 1:
        board.enter("critic_train", 3)
        time.sleep(6)
    dist.barrier()  # the default group (spawn's 300 s): everyone ends together
    return out


@pytest.mark.timeout(180)
def test_groups_time_out_after_the_option_and_the_missing_rank_is_named() -> None:
    took, line = spawn(_timeout_world, 3)[0]
    assert 1.5 < took < 20  # torch's default for a new group would be 30 minutes
    assert line.startswith("rank 0 timed out in actor_train at step 3: Timed out waiting 2000ms")
    assert "rank 1 (pid " in line and ", alive) is in critic_train at step 3 for " in line
    assert "rank 2" in line  # in another phase too: named, not hidden


def test_a_dead_peer_is_named_with_how_it_ended(tmp_path: Path) -> None:
    me, peer = StatusBoard(tmp_path, 0), StatusBoard(tmp_path, 1)
    me.enter("rows for ref_inf", 3)
    child = subprocess.Popen(["sleep", "0"])
    child.wait()  # a process that has ended: its pid is gone
    peer.state = type(peer.state)(1, child.pid, peer.host, 3, "actor_gen", time.time())
    peer.enter("actor_gen", 3)
    line = describe_failure(me, 2, GLOO_CLOSED, exit_code=lambda r: -9 if r == 1 else None, wait_s=0)
    assert line == (
        f"rank 1 (pid {child.pid}) died (killed by SIGKILL) during actor_gen at step 3; "
        "rank 0 stopped in rows for ref_inf at step 3: Connection closed by peer [127.0.0.1]:4242"
    )
    line = describe_failure(me, 2, GLOO_CLOSED, wait_s=0)  # not its parent: how it ended is unknown
    assert line.startswith(f"rank 1 (pid {child.pid}) died during actor_gen at step 3; rank 0 stopped")


def test_only_collective_failures_are_renamed() -> None:
    assert is_collective_failure(GLOO_CLOSED)
    assert is_collective_failure(RuntimeError("Timed out waiting 2000ms for recv operation to complete"))
    assert not is_collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_collective_failure(ValueError("Connection closed by peer"))
    assert not is_collective_failure(RankFailure("rank 1 died (already named)"))
    assert exit_text(-9) == "killed by SIGKILL" and exit_text(3) == "exited with code 3"
