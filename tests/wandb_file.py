"""Read an offline `.wandb` run file back into wandb's own protobuf `Record` messages.

The file is a LevelDB-style block log: a 7-byte header (b":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first,
3 middle, 4 last). A block's tail shorter than a chunk header is zero padding. wandb ships no
Python reader for it, so stillhouse carries this one; the records themselves are parsed by wandb's
own `wandb_internal_pb2.Record`. A file whose writer was killed ends in a cut chunk: reading stops
before it.

The tests read what a job logged (the job itself keeps a ledger of what it handed to W&B, see
trainers/tracking.py, and never parses these files).
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
        if pos + HEADER + length > len(data):  # cut short by a killed writer
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


def run_files(run_dir: str | Path) -> list[Path]:
    """Every W&B run file a job wrote under `<run_dir>/wandb/` (offline and online runs; not the
    `latest-run` link, which points at one of them)."""
    wandb_dir = Path(run_dir) / "wandb"
    return sorted([*wandb_dir.glob("offline-run-*/run-*.wandb"), *wandb_dir.glob("run-*/run-*.wandb")])


def job_history(run_dir: str | Path, job_type: str) -> list[dict]:
    """The history rows of every run of `job_type` in this run dir, oldest run first. A file
    without a run record (its writer was killed before the first write reached the disk) holds
    nothing."""
    rows: list[dict] = []
    for path in run_files(run_dir):
        try:
            records = read_records(path)
            if not records or run_info(records)["job_type"] != job_type:
                continue
        except (ValueError, OSError):  # not readable as a run file: nothing logged there
            continue
        rows += history_rows(records)
    return rows


def logged_steps(run_dir: str | Path, job_type: str) -> set[int]:
    """The `_step`s that runs of `job_type` already wrote in this run dir."""
    return {int(row["_step"]) for row in job_history(run_dir, job_type) if "_step" in row}
