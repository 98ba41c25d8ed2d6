"""What the strategy does for Lightning's loggers."""

from __future__ import annotations

from typing import Any


def finish_wandb_runs(loggers: list[Any]) -> None:
    """Flush and close the W&B runs of a spawned worker.

    Workers started by multiprocessing end with ``os._exit``, which skips the exit hooks that
    would flush a W&B run; without this its last records (in offline mode: all of them, on a
    short run) never reach the run file.
    """
    for logger in loggers:
        run = getattr(logger, "_experiment", None)
        if type(logger).__name__ == "WandbLogger" and run is not None and hasattr(run, "finish"):
            run.finish()
