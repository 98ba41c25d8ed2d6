"""Folders that appear whole or not at all.

A checkpoint (training shards or an HF export) is written into a temporary folder beside its
target and then swapped in: the old folder is renamed aside (``<name>.old``), the new one renamed
into place, and only then is the old one removed. A crash between the two renames leaves
``<name>.old``, the previous complete folder, which :func:`complete_folder` falls back to; a
crash before leaves only a temporary folder, which is never read. Files and folders are
fsync'd before each rename, so a rename never outruns the data it publishes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

OLD_SUFFIX = ".old"
TMP_SUFFIX = ".tmp"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written: the message names the folder and what is wrong."""


def write_file(obj: Any, file: Path) -> None:
    """``torch.save`` that reaches the disk before returning (a later rename must not outrun it)."""
    import torch

    with open(file, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (new names, renames) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file and folder below ``path`` (files written by libraries that do not fsync)."""
    for root, _, names in os.walk(path):
        for name in names:
            fd = os.open(Path(root) / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def temp_folder(path: Path, unique: bool = True) -> Path:
    """A new empty folder beside ``path`` to write it in.

    ``unique`` (one writer): a fresh name per call. Otherwise ``<name>.tmp``, a name every rank
    can derive by itself when several ranks write into one folder; a leftover one is cleared.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if unique:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_SUFFIX}-", dir=path.parent))
    tmp = path.with_name(path.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, path: Path) -> None:
    """Put the complete folder ``tmp`` at ``path``; an existing ``path`` is removed only afterwards."""
    fsync_tree(tmp)
    old = path.with_name(path.name + OLD_SUFFIX)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def complete_folder(path: Path, marker: str) -> Path:
    """The complete folder for ``path``: ``path`` when it holds ``marker``, else the ``<name>.old``
    an interrupted swap left behind; a :class:`CheckpointError` when neither is complete."""
    if (path / marker).is_file():
        return path
    old = path.with_name(path.name + OLD_SUFFIX)
    if not path.exists() and (old / marker).is_file():
        return old
    raise CheckpointError(f"{path} is not a complete checkpoint folder (no {marker})")
