"""Run a function on N local processes joined in one torch.distributed world (tests, benchmarks, demos)."""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKEND_ENV = "LIGHTNING_REAL_BACKEND"
"""Environment variable that fixes :func:`spawn`'s default backend (the CPU tests set gloo)."""


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    out_dir: str,
    threads: int,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("LOCAL_RANK", str(rank))
    # Several ranks share few cores: one intra-op thread each avoids oversubscription.
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
    )
    path = Path(out_dir) / f"rank{rank}.pkl"
    try:
        result = fn(rank, world_size, *args)
        path.write_bytes(pickle.dumps(("ok", result)))
    except BaseException as e:
        path.write_bytes(pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 300.0,
    threads: int = 1,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return each rank's result.

    ``backend`` defaults to ``$LIGHTNING_REAL_BACKEND`` when set, else NCCL when enough GPUs are
    present, gloo otherwise. Collectives time out after ``timeout_s`` so a mismatched program
    fails instead of hanging. Results must pickle.
    """
    if backend is None:
        backend = os.environ.get(BACKEND_ENV) or None
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"spawn backend={backend!r}; allowed: 'gloo', 'nccl' or None (pick by hardware)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "gloo"
    with tempfile.TemporaryDirectory(prefix="lreal-spawn-") as out_dir:
        try:
            mp.start_processes(
                _worker,
                args=(world_size, free_port(), backend, timeout_s, out_dir, threads, fn, args),
                nprocs=world_size,
                join=True,
                start_method="spawn",
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            # Report the first rank's own error (the others usually fail on its absence).
            for r in range(world_size):
                if (Path(out_dir) / f"rank{r}.pkl").exists():
                    _result(out_dir, r)
            raise
        return [_result(out_dir, r) for r in range(world_size)]


def _result(out_dir: str, rank: int) -> Any:
    """A rank's return value, or the rank's own error raised here."""
    status, value = pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())
    if status != "ok":
        raise RuntimeError(f"rank {rank} failed: {value}")
    return value
