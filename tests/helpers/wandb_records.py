"""Read back what wandb wrote in offline mode: a ``run-<id>.wandb`` file is a
LevelDB-style log (a 7-byte W&B header, 32 KiB blocks of records each with a 7-byte
header, records split FIRST/MIDDLE/LAST across blocks) of protobuf ``Record``s."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    assert raw[:4] == b":W&B", raw[:7]
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(raw):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        data = raw[pos:pos + length]
        pos += length
        if kind == FULL:
            out.append(data)
        elif kind == FIRST:
            pending = data
        elif kind == MIDDLE:
            pending += data
        elif kind == LAST:
            out.append(pending + data)
    return out


def history(run_dir: Path) -> dict[int, dict]:
    """{step: {key: value}} of every offline run of wandb under ``run_dir``."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[int, dict] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for data in records(path):
            record = pb.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") != "history":
                continue
            items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out.setdefault(int(items["_step"]), {}).update(items)
    return out
