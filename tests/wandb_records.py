"""Read the history rows of an offline W&B run file (``run-*.wandb``) without the network.

The file is a LevelDB-style log (the format wandb's own writer documents): a 7-byte file header,
then 32 KiB blocks of chunks, each chunk with a 7-byte header (crc32, length, type) and a
protobuf ``Record`` split over FULL / FIRST / MIDDLE / LAST chunks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    out: list[bytes] = []
    pos, partial = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:
            pos += left  # zero padding up to the next block
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            partial = chunk
        elif kind == MIDDLE:
            partial += chunk
        elif kind == LAST:
            out.append(partial + chunk)
            partial = b""
    return out


def history(run_file: str | Path) -> list[dict[str, Any]]:
    """Every ``wandb.log`` row of the run, as ``{key: value}``."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _records(Path(run_file).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in rec.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows
