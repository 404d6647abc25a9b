"""Stop what a killed driver's embedded Ray cluster leaves behind.

When `stillhouse run` is killed outright (SIGKILL, the OOM killer), Ray's GCS, raylet and workers
go down with it, but Ray 2.60's dashboard agent and runtime-env agent keep running, orphaned,
for good. `embedded_cluster` therefore starts this small watcher beside the cluster:

    python -m cluster.reaper DRIVER_PID      (stdin: a pipe from the driver)

It notes every process that appears under the driver while the cluster is up. A driver that
shuts its cluster down writes `done` and closes the pipe, and the watcher exits. A pipe that
closes without `done` means the driver died: the watcher gives the processes it noted a few
seconds to exit on their own, then SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import psutil

POLL_S = 1.0
GRACE_S = 5.0


def _note(driver: psutil.Process, seen: dict[int, float], own: int) -> None:
    try:
        for p in driver.children(recursive=True):
            if p.pid != own and p.pid not in seen:
                try:
                    seen[p.pid] = p.create_time()
                except psutil.NoSuchProcess:
                    pass
    except psutil.NoSuchProcess:
        pass


def _alive(seen: dict[int, float]) -> list[psutil.Process]:
    """The noted processes still running (the same process, not a new one with its pid)."""
    left = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def stop_processes(procs: list[psutil.Process], grace_s: float) -> None:
    """SIGTERM each, then SIGKILL those still running after `grace_s` seconds."""
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(procs, timeout=grace_s)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=10)


def watch(driver_pid: int) -> int:
    """Returns how many processes it had to stop."""
    driver = psutil.Process(driver_pid)
    seen: dict[int, float] = {}
    verdict: list[str] = []
    reader = threading.Thread(target=lambda: verdict.append(sys.stdin.read()), daemon=True)
    reader.start()
    while reader.is_alive():
        _note(driver, seen, psutil.Process().pid)
        reader.join(POLL_S)
    if verdict and verdict[0].strip() == "done":
        return 0
    deadline = time.monotonic() + GRACE_S
    while _alive(seen) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = _alive(seen)
    stop_processes(left, grace_s=5)
    if left:
        sys.stderr.write(f"[stillhouse] the driver {driver_pid} died; stopped {len(left)} "
                         "processes its Ray cluster left behind\n")
    return len(left)


class Reaper:
    """The driver's side: start the watcher, and tell it when the cluster was shut down."""

    def __init__(self) -> None:
        import os

        self._proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.reaper", str(os.getpid())], stdin=subprocess.PIPE,
            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

    def done(self) -> None:
        try:
            self._proc.stdin.write("done")
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the job's terminal is the driver's
    watch(int(sys.argv[1]))
