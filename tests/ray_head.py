"""Start a real Ray head (`ray start --head --block`) for a test, and stop exactly what it started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import psutil

from cluster.reaper import stop_processes

BIN = Path(sys.executable).parent
TOKEN = "stillhouse-test-token-4f1c9a"  # a planted secret: tests check it never lands in a file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_env(token: str | None) -> dict:
    """The environment of a client that has (or lacks) the cluster's token."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS",
                        "WANDB_API_KEY")}
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    if token is not None:
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = token
    return env


CPUS = ("import json, ray; ray.init(address='{gcs}', logging_level='error'); "
        "print(json.dumps([ray.available_resources().get('CPU', 0.0), "
        "ray.cluster_resources().get('CPU', 0.0)]))")


def wait_until_idle(head: "HeadAddress", timeout: float = 60) -> tuple[float, float]:
    """Wait until every CPU of the cluster is free again (a finished or stopped job returned its
    actors' and workers' CPUs); returns (available, total). Asks through a fresh driver, which
    holds no CPU itself."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run([sys.executable, "-c", CPUS.format(gcs=head.gcs)],
                             env=token_env(TOKEN), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        available, total = json.loads(out.stdout.strip().splitlines()[-1])
        if available == total or time.monotonic() > deadline:
            return available, total
        time.sleep(2)


class HeadAddress(str):
    """The dashboard address (what the Jobs API wants), with the GCS address as `.gcs`."""

    gcs: str


@contextmanager
def ray_head(token: str, num_cpus: int = 2, log_path: Path | None = None):
    """Yield the dashboard address of a new token-authenticated head on 127.0.0.1."""
    port, dashboard = free_port(), free_port()
    log = open(log_path or os.devnull, "w")
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", f"--num-cpus={num_cpus}", "--disable-usage-stats",
         # the agents' fixed default ports would collide with any other head on this machine
         # (another test session's): the job agent of the second one never comes up
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        # one machine is never drained: no Ray Train preemption watcher (an actor process per
        # worker group), as on an embedded cluster (cluster/local.py)
        env={**token_env(token), "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = HeadAddress(f"http://127.0.0.1:{dashboard}")
    address.gcs = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, "ray start exited early"
            try:
                request = urllib.request.Request(f"{address}/api/version",
                                                 headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(request, timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, "the head's dashboard never came up"
                time.sleep(0.5)
        yield address
    finally:
        # Ray's processes sit out a grace period on SIGTERM (16 s for `ray stop`); a test head
        # holds nothing that needs it
        stop_tree(proc, grace_s=2)
        log.close()
        # `ray start` records its cluster for `address="auto"` lookups; forget ours
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip() == f"127.0.0.1:{port}":
            current.unlink()


def stop_tree(proc: subprocess.Popen, grace_s: float = 15) -> None:
    """SIGTERM, then (after `grace_s`) SIGKILL, the process and every descendant it started."""
    try:
        tree = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    stop_processes(tree, grace_s=grace_s)
    if proc.poll() is None:
        proc.wait(timeout=10)
