"""Run a recipe (``lightning-real run``'s code path) with one rank killed at a chosen point.

    python tests/scripts/fault_run.py RANK POINT STEP RECIPE [KEY=VALUE ...]

POINT is where rank RANK dies by SIGKILL (no handler runs, nothing is flushed: as an OOM kill
or a lost machine), in the iteration whose global step is STEP (0-based) or in the checkpoint
written after STEP iterations:

* ``generate``: inside the call ``actor_gen``;
* ``realloc``: inside the move of the actor's parameters to ``actor_gen``'s layout;
* ``checkpoint``: half-way through writing this rank's shard of ``step{STEP:06d}.ckpt``;
* ``swap``: between the two renames that replace ``last.ckpt`` (``last.ckpt`` is renamed aside
  to ``last.ckpt.old``, the new folder is not in place yet);
* ``hang``: no kill: the rank stops answering inside ``actor_gen`` (sleeps), so the others wait
  until the collective timeout.

Lightning starts ranks 1.. by re-running this command line, so every rank installs the same
hooks and only rank RANK dies. Just before dying (or hanging) it writes the time into
``$FAULT_KILLED_AT`` (a file), so the caller can measure how long the others take to stop.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

import lightning_real.checkpoint.sharded as sharded
from lightning_real.recipes.run import main
from lightning_real.runtime.executor import Executor
from lightning_real.strategy import RealStrategy

RANK, POINT, STEP = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
POINTS = ("generate", "realloc", "checkpoint", "swap", "hang")
if POINT not in POINTS:
    raise SystemExit(f"fault_run.py: POINT={POINT!r}; allowed: {', '.join(POINTS)}")
saved_step: list[int | None] = [None]
"""Global step of the checkpoint being written."""


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else -1


def _die() -> None:
    stamp = os.environ.get("FAULT_KILLED_AT")
    if stamp:
        Path(stamp).write_text(str(time.time()))
    if POINT == "hang":
        time.sleep(3600)  # alive, answering nothing; the launcher kills it when the others give up
    os.kill(os.getpid(), signal.SIGKILL)


_init = Executor.__init__


def _executor_init(self: Executor, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    if POINT in ("generate", "hang"):
        body = self.fns["actor_gen"]

        def generate(shard: Any, rows: Any) -> Any:
            if self.rank == RANK and self.tracer.step == STEP:
                _die()
            return body(shard, rows)

        self.fns["actor_gen"] = generate
    if POINT == "realloc":
        move, target = self.move, self.plan["actor_gen"]

        def realloc(role: str, layout: Any) -> Any:
            if role == "actor" and layout == target and self.rank == RANK and self.tracer.step == STEP:
                _die()
            return move(role, layout)

        self.move = realloc


_save = RealStrategy.save_checkpoint


def _save_checkpoint(self: RealStrategy, checkpoint: dict[str, Any], *args: Any, **kwargs: Any) -> None:
    saved_step[0] = checkpoint.get("global_step")
    _save(self, checkpoint, *args, **kwargs)


_write = sharded.write_file


def _write_file(obj: Any, file: Path) -> None:
    if (
        POINT == "checkpoint"
        and _rank() == RANK
        and file.name.startswith("shard-")
        and file.parent.name.startswith(f"step{STEP:06d}")
    ):
        with open(file, "wb") as f:
            f.write(b"half a shard")
            f.flush()
        _die()
    _write(obj, file)


_replace = os.replace


def _os_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    _replace(src, dst, *args, **kwargs)
    if (
        POINT == "swap"
        and _rank() == RANK
        and Path(src).name == "last.ckpt"
        and Path(dst).name == "last.ckpt.old"
        and saved_step[0] == STEP
    ):
        _die()


Executor.__init__ = _executor_init  # type: ignore[method-assign]
RealStrategy.save_checkpoint = _save_checkpoint  # type: ignore[method-assign]
sharded.write_file = _write_file
os.replace = _os_replace

if __name__ == "__main__":
    sys.exit(main(sys.argv[4:]))
