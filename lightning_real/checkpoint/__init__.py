"""Checkpoint folders on disk: atomic swaps, per-rank sharded training checkpoints, RNG states
(resharding onto another plan lives one layer up, in :mod:`lightning_real.resume`).

* :mod:`~lightning_real.checkpoint.folders`: the one atomic folder swap (fsync'd) and the one
  error type, used by training checkpoints and HF exports alike;
* :mod:`~lightning_real.checkpoint.sharded`: RealStrategy's checkpoint format, one shard file
  per rank plus ``meta.pt``;
* :mod:`~lightning_real.checkpoint.rng`: the random states a rank saves and restores.
"""

from lightning_real.checkpoint.folders import (
    CheckpointError,
    complete_folder,
    swap_in,
    temp_folder,
    write_file,
)
from lightning_real.checkpoint.rng import rng_states, set_rng_states

__all__ = [
    "CheckpointError",
    "complete_folder",
    "rng_states",
    "set_rng_states",
    "swap_in",
    "temp_folder",
    "write_file",
]
