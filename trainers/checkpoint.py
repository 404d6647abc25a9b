"""Job checkpoints that are either complete or ignored, never half-loaded.

DeepSpeed writes its checkpoints in place and silently starts fresh when its `latest` tag is
missing, so the job keeps its own commit protocol on top:

1. every file is written under `<root>/.partial-<name>/` (DeepSpeed's own files included);
2. `COMPLETE.json` lists each file with its size and sha256, and is written last;
3. the folder is renamed to `<root>/<name>/` (atomic on one filesystem) and the parent fsynced.

A folder named like a checkpoint without a valid manifest is damage, not a fresh start: loading it
raises `CheckpointError`. Leftover `.partial-*` folders are from a crash and are discarded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from specs.errors import InputError

MANIFEST = "COMPLETE.json"
PARTIAL_PREFIX = ".partial-"


class CheckpointError(InputError):
    """A checkpoint folder exists but is not a complete, intact checkpoint."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_path(root: Path, name: str) -> Path:
    return root / f"{PARTIAL_PREFIX}{name}"


def begin(root: Path, name: str) -> Path:
    """A fresh, empty staging folder for checkpoint `name` (a crashed attempt's leftovers go)."""
    staging = partial_path(root, name)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def commit(root: Path, name: str, meta: dict) -> Path:
    """Seal the staging folder: manifest last, then rename into place."""
    staging = partial_path(root, name)
    final = root / name
    if final.exists():
        raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it")
    files = {}
    for path in sorted(p for p in staging.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(staging))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = staging / MANIFEST
    with open(manifest, "w") as f:
        json.dump({"name": name, "meta": meta, "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(staging, final)
    fsync_dir(root)
    return final


def verify(folder: Path) -> dict:
    """Check every file against the manifest; returns the manifest's `meta`."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it is not a complete checkpoint. Move it away to rerun "
            "that stage, or restore it; stillhouse will not silently start that stage fresh"
        )
    try:
        body = json.loads(manifest.read_text())
        files, meta = body["files"], body["meta"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{manifest} is unreadable or malformed: {err}") from None
    for rel, expected in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{folder}: file {rel} listed in {MANIFEST} is missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{folder}: file {rel} does not match its {MANIFEST} entry")
    return meta


def complete_checkpoints(root: Path, names: list[str]) -> list[str]:
    """The leading run of `names` that are committed and intact, in order.

    A checkpoint folder present after a gap, or one that fails verification, is an error: the run
    dir is not in a state any run of this job could have left.
    """
    done: list[str] = []
    for name in names:
        folder = root / name
        if not folder.exists():
            break
        verify(folder)
        done.append(name)
    later = [n for n in names[len(done) :] if (root / n).exists()]
    if later:
        raise CheckpointError(
            f"checkpoints {later} exist in {root} after the missing {names[len(done)]!r}"
        )
    return done
