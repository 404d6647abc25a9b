"""Exclusive locks that die with their process: `flock` on a file, holding the holder's pid.

The kernel drops a `flock` when the process that holds it exits, however it exits, so a killed
job or scheduler never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


RUN_LOCK = ".lock"  # in a run dir: held exclusively by the job's driver
WORKERS_LOCK = ".workers.lock"  # in a run dir: held shared by each of the job's workers


class LockHeld(Exception):
    """Another live process holds the lock; the message names it (`pid N`)."""


def exclusive_lock(path: Path) -> IO:
    """Take the lock at `path` (created if need be) or raise LockHeld. Keep the returned file
    open for as long as the lock is to be held."""
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LockHeld(holder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    return handle


def shared_lock(path: Path) -> IO:
    """Take a shared hold on `path` (many holders at once); keep the file open to keep it."""
    handle = open(path, "a+")
    fcntl.flock(handle, fcntl.LOCK_SH)
    return handle


def wait_until_free(path: Path, timeout: float, poll: float = 0.5) -> bool:
    """Wait until no process holds `path` (shared or exclusive); False if `timeout` passed."""
    import time

    deadline = time.monotonic() + timeout
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                return True
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return False
                time.sleep(poll)
