"""Exclusive locks that die with their process: `flock` on a file, holding the holder's pid.

The kernel drops a `flock` when the process that holds it exits, however it exits, so a killed
job or scheduler never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO


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
