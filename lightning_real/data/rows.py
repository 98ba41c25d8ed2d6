"""Read text rows from a JSONL file or a local HF ``datasets`` folder, checking required fields."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data: the message names the file, the line (or row) and the field."""


@dataclass(frozen=True)
class Row:
    """One row's text fields and where it came from."""

    fields: dict[str, str]
    """The required fields, as strings."""
    where: str
    """``file line N`` or ``folder row N``, for messages."""
    index: int
    """Position of the row in its source (0-based, blank lines not counted)."""


def read_rows(path: str | Path, fields: tuple[str, ...], split: str = "train") -> list[Row]:
    """Every row of ``path`` with the string ``fields`` each must have.

    ``path`` is a JSONL file (one JSON object per line; blank lines are skipped) or a folder
    written by ``datasets.Dataset.save_to_disk`` (``split`` picks the split of a DatasetDict).
    A row lacking a field, or holding a non-string there, raises one :class:`DataError` naming the
    file, line and field.
    """
    p = Path(path)
    if p.is_dir():
        return _read_hf(p, fields, split)
    if not p.is_file():
        raise DataError(f"data file {str(p)!r} does not exist")
    rows: list[Row] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{p} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            rows.append(_check(obj, fields, where, len(rows)))
    return rows


def _check(obj: Any, fields: tuple[str, ...], where: str, index: int) -> Row:
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: expected a JSON object with fields {list(fields)}, got {type(obj).__name__}"
        )
    out: dict[str, str] = {}
    for f in fields:
        if f not in obj:
            raise DataError(
                f"{where}: missing field {f!r} (the row has: {', '.join(map(str, obj)) or 'nothing'})"
            )
        v = obj[f]
        if not isinstance(v, str):
            raise DataError(f"{where}: field {f!r} must be a string, got {type(v).__name__}")
        out[f] = v
    return Row(out, where, index)


def _read_hf(folder: Path, fields: tuple[str, ...], split: str) -> list[Row]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{folder} is a folder: reading a saved HF dataset needs the 'datasets' package "
            "(pip install datasets), or give a JSONL file"
        ) from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{folder}: no split {split!r}; splits: {', '.join(ds)}")
        ds = ds[split]
    return [_check(dict(r), fields, f"{folder} row {i}", i) for i, r in enumerate(ds)]
