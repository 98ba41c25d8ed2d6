"""RealStrategy's checkpoint format: one folder per checkpoint, one shard file per rank.

``<name>/shard-rank{r}.pt`` holds rank ``r``'s part of the models and optimizer states and its
random states; ``<name>/meta.pt`` holds Lightning's loop, optimizer and callback state, the world
size, the plan, the list of shards and the architecture of every trained role. Every element of
a shard is a slice of a canonical (layout-independent) tensor and the shard records which: a run
with the checkpoint's world size and plan reads its own shard back as it was (exact resume), any
other reads every shard and reslices the models and optimizer states onto its own layouts
(:mod:`~lightning_real.resume.canonical`). Every rank writes into ``<name>.tmp``; only when all
succeeded does rank 0 add ``meta.pt`` (last: a folder with it is complete) and swap the folder
in (:func:`~lightning_real.checkpoint.folders.swap_in`). A failure on any rank raises on every
rank and leaves earlier checkpoints as they were. All ranks must share the filesystem.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@dataclass
class LoadedCheckpoint:
    """What :func:`load_sharded` read."""

    folder: Path
    """The complete folder read (``<name>.old`` after an interrupted save)."""
    meta: dict[str, Any]
    """``meta.pt``: Lightning's state, the world size, the plan, the trained roles' specs."""
    shards: dict[int, dict[str, Any]]
    """Shards by the rank that wrote them: this rank's alone when the run has the checkpoint's
    world size and plan, every rank's otherwise (to be resliced in canonical coordinates)."""

    same_layout: bool
    """Whether the run has the checkpoint's world size and plan (this rank's shard is all it needs)."""


def load_sharded(
    path: Path,
    rank: int,
    world_size: int,
    plan: Mapping[str, str],
    check_meta: Callable[[Path, dict[str, Any]], None] | None = None,
) -> LoadedCheckpoint:
    """Read the checkpoint at ``path`` for rank ``rank`` of a run of ``world_size`` under ``plan``.

    With the checkpoint's world size and plan, a rank reads its own shard (the exact resume);
    otherwise every shard, memory-mapped, for :mod:`~lightning_real.resume.canonical` to
    reslice onto this run's layouts. ``check_meta(folder, meta)`` runs before any shard is read.
    Every rank checks the whole folder, so every rank fails alike.
    """
    folder = checkpoint_folder(path)
    meta = torch.load(folder / META_FILE, map_location="cpu", weights_only=False)
    if check_meta is not None:
        check_meta(folder, meta)
    names = list(meta.get("shards", []))
    missing = [name for name in names if not (folder / name).is_file()]
    if missing or not names:
        raise CheckpointError(f"checkpoint {folder} lacks {missing or 'its shards'}")
    same = meta.get("world_size") == world_size and meta.get("plan") == dict(plan)
    ranks = [rank] if same else list(range(len(names)))
    shards = {
        r: torch.load(folder / shard_file(r), map_location="cpu", weights_only=False, mmap=not same)
        for r in ranks
    }
    return LoadedCheckpoint(folder, meta, shards, same)


def remove_folder(path: Path, rank: int) -> None:
    """Delete a checkpoint folder (rank 0); renamed first, so a half-deleted folder never carries
    a checkpoint's name."""
    import os

    if rank == 0 and path.exists():
        gone = path.with_name(f".{path.name}.removing-{os.getpid()}")
        os.replace(path, gone)
        shutil.rmtree(gone, ignore_errors=True)
