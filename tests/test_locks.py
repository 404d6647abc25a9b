"""Run-dir and store locks between real processes: held while the holder lives, gone when it
dies however it dies."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.locks import LockHeld, exclusive_lock, wait_until_free

ROOT = Path(__file__).resolve().parents[1]
HOLD = ("import sys, time; from pathlib import Path; from trainers.locks import {fn}; "
        "h = {fn}(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


def _holder(path: Path, fn: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(fn=fn), str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_exclusive_lock_names_its_holder_and_dies_with_it(tmp_path):
    path = tmp_path / ".lock"
    holder = _holder(path, "exclusive_lock")
    try:
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            exclusive_lock(path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    exclusive_lock(path).close()  # the kernel dropped the killed holder's lock


def test_a_new_driver_waits_for_workers_that_still_hold_the_run_dir(tmp_path):
    path = tmp_path / ".workers.lock"
    workers = [_holder(path, "shared_lock") for _ in range(2)]  # many workers hold it at once
    try:
        started = time.monotonic()
        assert not wait_until_free(path, timeout=1.0, poll=0.1)
        assert time.monotonic() - started >= 1.0
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait()
        assert not wait_until_free(path, timeout=0.5, poll=0.1)  # one worker is still there
    finally:
        for w in workers:
            w.send_signal(signal.SIGKILL)
            w.wait()
    assert wait_until_free(path, timeout=5, poll=0.1)
