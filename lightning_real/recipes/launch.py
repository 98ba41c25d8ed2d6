"""How a recipe's processes start: under torchrun (or ``fabric run``), or launched by Lightning.

Under torchrun the processes already exist: Lightning reads the torchelastic environment, and
the run takes torchrun's processes per node and nodes, whatever the recipe's devices say. Otherwise Lightning starts
them, either by re-running this process's command line once per rank ('popen', Lightning's way
for scripts) or by spawning workers from this process ('spawn', needed when the recipe was
started from Python, e.g. a test or a notebook, whose command line would not run it again).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_real.recipes.errors import RecipeError
from lightning_real.recipes.schema import TrainerConfig


def under_torchrun() -> bool:
    """Whether torchrun (torchelastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@dataclass(frozen=True)
class World:
    """Processes of the run."""

    devices: int
    """Processes per node."""
    num_nodes: int
    """Nodes."""

    @property
    def size(self) -> int:
        """All processes."""
        return self.devices * self.num_nodes


def local_devices(accelerator: str) -> int:
    """Processes to start on this machine when the recipe leaves it open: one per visible GPU,
    or one on CPU."""
    import torch

    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.device_count()
    return 1


def resolve_world(trainer: TrainerConfig) -> World:
    """Devices and nodes of the run. Under torchrun they are torchrun's: a recipe's own
    ``trainer.devices`` / ``trainer.num_nodes`` (the tiny recipes say 4 devices) give way to the
    processes the launcher started, with one line saying so."""
    for key in ("devices", "num_nodes"):
        v = getattr(trainer, key)
        if v is not None and v < 1:
            raise RecipeError(f"key 'trainer.{key}': {v} is not allowed; allowed: an integer >= 1 or null")
    if not under_torchrun():
        return World(trainer.devices or local_devices(trainer.accelerator), trainer.num_nodes or 1)
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % local:
        raise RecipeError(
            f"torchrun's world size {world} is not a whole number of nodes of {local} processes; "
            "start the same --nproc-per-node on every node"
        )
    nodes = world // local
    for key, given, actual, flag in (
        ("devices", trainer.devices, local, "--nproc-per-node"),
        ("num_nodes", trainer.num_nodes, nodes, "--nnodes"),
    ):
        if given is not None and given != actual:
            from lightning.pytorch.utilities.rank_zero import rank_zero_info

            rank_zero_info(
                f"trainer.{key}={given} from the recipe gives way to torchrun's {flag} {actual}: "
                "a run under a launcher takes the launcher's processes"
            )
    return World(local, nodes)


def start_method(trainer: TrainerConfig, argv: Sequence[str] | None) -> str:
    """Lightning's start method for this run (see :attr:`TrainerConfig.start_method`).

    ``argv`` are the arguments the recipe was started with (None: this process's command line).
    'popen' re-runs ``sys.argv``, which reproduces the run only when the recipe's arguments are
    this process's own trailing arguments.
    """
    if under_torchrun():
        return "popen"  # torchrun made the processes; Lightning launches nothing
    if trainer.start_method != "auto":
        return trainer.start_method
    if argv is None:
        return "popen"
    args = list(argv)
    return "popen" if args and sys.argv[-len(args) :] == args else "spawn"
