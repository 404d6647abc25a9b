"""Read an offline `.wandb` run file back into wandb's own protobuf `Record` messages.

The file is a LevelDB-style block log: a 7-byte header (b":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last). A block's tail shorter than a chunk header is zero padding. wandb ships no
Python reader for it, so the tests carry this one; the records themselves are parsed by wandb's
own `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file")
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # zero padding at the end of a block
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # preallocated, never written
            break
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        else:
            raise ValueError(f"{path}: bad chunk type {kind} at byte {pos}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


def history_rows(records) -> list[dict]:
    """Each `history` record as {key: value} (values JSON-decoded), `_step` included."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in r.history.item})
    return rows


def run_info(records) -> dict:
    """group, job_type and config of the run (from its `run` record)."""
    for r in records:
        if r.WhichOneof("record_type") == "run":
            config = {item.key: json.loads(item.value_json) for item in r.run.config.update}
            return {"group": r.run.run_group, "job_type": r.run.job_type, "config": config,
                    "project": r.run.project}
    raise ValueError("no run record")
