"""Which models a checkpoint holds: each trained role's architecture, checked on load.

A checkpoint records the :class:`~lightning_real.models.spec.ModelSpec` of every trained role
(``meta.pt`` ``roles``). Loading compares them with the run's trained roles before any tensor is
read, so a different architecture or a missing role fails with one error naming what differs,
under the same plan or another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning_real.checkpoint.folders import CheckpointError
from lightning_real.models.spec import ModelSpec


def role_specs(specs: Mapping[str, ModelSpec]) -> dict[str, dict[str, Any]]:
    """What ``meta.pt`` records: each trained role's spec, as plain fields."""
    return {role: dataclasses.asdict(spec) for role, spec in sorted(specs.items())}


def check_roles(
    folder: Path, saved: Mapping[str, Mapping[str, Any]] | None, specs: Mapping[str, ModelSpec]
) -> None:
    """Raise a :class:`CheckpointError` when the checkpoint's trained roles or their models differ
    from ``specs`` (the run's trained roles); checkpoints that recorded no roles pass."""
    if saved is None:
        return
    missing = sorted(set(specs) - set(saved))
    extra = sorted(set(saved) - set(specs))
    if missing or extra:
        parts = [f"no state for role {r!r}" for r in missing] + [
            f"role {r!r}, which this run does not train" for r in extra
        ]
        raise CheckpointError(
            f"checkpoint {folder} has {' and '.join(parts)} (checkpoint: {', '.join(sorted(saved)) or 'none'}; "
            f"this run: {', '.join(sorted(specs)) or 'none'})"
        )
    for role, spec in sorted(specs.items()):
        mine = dataclasses.asdict(spec)
        theirs = saved[role]
        differ = [
            f"{k} {theirs.get(k)!r} (checkpoint) vs {mine.get(k)!r} (this run)"
            for k in sorted(set(mine) | set(theirs))
            if theirs.get(k) != mine.get(k)
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint {folder}: role {role!r} was saved as a different model: {'; '.join(differ)}"
            )
