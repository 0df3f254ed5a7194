"""Read the records of an offline W&B run file (``run-*.wandb``), for tests.

wandb 0.31 ships no Python reader: the file is a LevelDB-style log (7-byte header ``:W&B`` +
magic + version, then 32 KiB blocks of records each with a 7-byte header: crc32, length, type
FULL/FIRST/MIDDLE/LAST), each record a serialised ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK, HEADER = 32768, 7
FULL, FIRST, LAST = 1, 2, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, out, buf = HEADER, [], b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's tail is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER: pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (FULL, FIRST) else buf + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
    return out


def artifacts(path: Path) -> list[tuple[str, str, bool]]:
    """``(name, type, used_as_input)`` of every artifact record of a run."""
    return [(r.artifact.name, r.artifact.type, r.artifact.use_after_commit) for r in records(path)
            if r.WhichOneof("record_type") == "artifact"]
