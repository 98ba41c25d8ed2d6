"""RealStrategy's checkpoint format: one folder per checkpoint, one shard file per rank.

``<name>/shard-rank{r}.pt`` holds rank ``r``'s part of the models and optimizer states and its
random states; ``<name>/meta.pt`` holds Lightning's loop, optimizer and callback state, the world
size, the plan and the list of shards. Every rank writes into ``<name>.tmp``; only when all
succeeded does rank 0 add ``meta.pt`` (last: a folder with it is complete) and swap the folder
in (:func:`~lightning_real.checkpoint.folders.swap_in`). A failure on any rank raises on every
rank and leaves earlier checkpoints as they were. All ranks must share the filesystem.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_real.checkpoint.folders import (
    OLD_SUFFIX,
    TMP_SUFFIX,
    CheckpointError,
    complete_folder,
    swap_in,
    temp_folder,
    write_file,
)
from lightning_real.distributed.agree import on_every_rank

META_FILE = "meta.pt"


def shard_file(rank: int) -> str:
    """Name of rank ``rank``'s file in a checkpoint folder."""
    return f"shard-rank{rank}.pt"


def checkpoint_folder(path: Path) -> Path:
    """The complete checkpoint folder for ``path`` (``<name>.old`` when a save was interrupted
    between its two renames), or a :class:`CheckpointError`."""
    found = complete_folder(path, META_FILE)
    if found != path:
        from lightning.pytorch.utilities.rank_zero import rank_zero_warn

        rank_zero_warn(f"checkpoint {path} is missing; loading {found.name}, left by an interrupted save")
    return found


def newest_checkpoint(folder: Path) -> Path | None:
    """The most recently completed checkpoint in ``folder`` (by the time its ``meta.pt`` was
    written, the last file of a save), or None. A ``<name>.old`` stands for ``<name>`` only when
    ``<name>`` itself is gone (an interrupted swap); temporary folders are never published."""
    if not folder.is_dir():
        return None
    found: list[tuple[float, Path]] = []
    for child in folder.iterdir():
        if child.name.startswith(".") or child.name.endswith(TMP_SUFFIX):
            continue
        name = child.name.removesuffix(OLD_SUFFIX)
        if child.name.endswith(OLD_SUFFIX) and (folder / name).exists():
            continue
        meta = child / META_FILE
        if meta.is_file():
            found.append((meta.stat().st_mtime, folder / name))
    return max(found)[1] if found else None


def _on_every_rank(what: str, fn: Callable[[], Any]) -> None:
    on_every_rank(fn, f"{what} failed; nothing was replaced", CheckpointError)


def save_sharded(
    path: Path,
    rank: int,
    world_size: int,
    shard: Callable[[], dict[str, Any]],
    meta: Callable[[], dict[str, Any]],
) -> None:
    """Write the checkpoint folder ``path``: ``shard()`` on every rank, ``meta()`` on rank 0.

    Collective over the default group.
    """
    tmp = path.with_name(path.name + ".tmp")

    def prepare() -> None:
        if rank == 0:
            temp_folder(path, unique=False)

    def write_shard() -> None:
        write_file(shard(), tmp / shard_file(rank))

    def publish() -> None:
        if rank == 0:
            data = meta()
            data["world_size"] = world_size
            data["shards"] = [shard_file(r) for r in range(world_size)]
            write_file(data, tmp / META_FILE)
            swap_in(tmp, path)

    _on_every_rank(f"checkpoint {path}: creating {tmp.name}", prepare)
    try:
        _on_every_rank(f"checkpoint {path}: writing the shards", write_shard)
        _on_every_rank(f"checkpoint {path}: publishing", publish)
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_sharded(
    path: Path, rank: int, world_size: int, plan: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(meta, this rank's shard)`` of the checkpoint at ``path``.

    The run must have the checkpoint's world size and plan: shards and optimizer states are per
    layout position. Every rank checks the whole folder, so every rank fails alike.
    """
    folder = checkpoint_folder(path)
    meta = torch.load(folder / META_FILE, map_location="cpu", weights_only=False)
    if meta.get("world_size") != world_size:
        raise CheckpointError(
            f"checkpoint {folder} was written by {meta.get('world_size')} ranks; this run has {world_size}"
        )
    if meta.get("plan") != dict(plan):
        raise CheckpointError(
            f"checkpoint {folder} was written under plan {meta.get('plan')}; this run's plan is "
            f"{dict(plan)} (shards and optimizer states belong to their layouts)"
        )
    missing = [name for name in meta.get("shards", []) if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks {missing}")
    shard = torch.load(folder / shard_file(rank), map_location="cpu", weights_only=False)
    return meta, shard


def remove_folder(path: Path, rank: int) -> None:
    """Delete a checkpoint folder (rank 0); renamed first, so a half-deleted folder never carries
    a checkpoint's name."""
    import os

    if rank == 0 and path.exists():
        gone = path.with_name(f".{path.name}.removing-{os.getpid()}")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
