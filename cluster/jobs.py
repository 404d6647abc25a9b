"""Jobs on a running Ray cluster, through the Ray Jobs API (the dashboard's HTTP endpoint).

    stillhouse submit examples/digits.yaml --address http://127.0.0.1:8265 --run-dir /data/runs/d1
    stillhouse status JOB_ID --address ...      # also: logs [--follow], stop, list

The submitted entrypoint runs the same driver as `stillhouse run`, connected to the cluster it
runs in (`--address auto`) instead of starting an embedded one. The spec travels in the job's
`working_dir`; the stillhouse packages travel as `py_modules`, so the cluster needs only the
engines (torch, Ray, DeepSpeed, wandb) installed.

Token authentication: with `RAY_AUTH_MODE=token`, Ray's client sends the token it finds in
`RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token`. The token is
never written into the job's runtime environment, its entrypoint or any stillhouse file.
"""

from __future__ import annotations

import shlex
import tempfile
import time
from pathlib import Path

import yaml

from specs import JobSpec

PACKAGES = ("specs", "orchestrator", "trainers", "cluster")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
JOB_RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}  # see cluster/local.py


class ClusterError(Exception):
    """A request to the cluster failed; the message is one line, fit for the terminal."""


class NoSuchJob(ClusterError):
    """The cluster answered, and has no job with that id."""


class JobExists(ClusterError):
    """The cluster already has a job with the submission id asked for."""


def _explain(err: Exception, address: str) -> ClusterError:
    text = str(err)
    if "401" in text or "Missing authentication token" in text or "no authentication token" in text:
        return ClusterError(
            f"{address} requires a Ray token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)"
        )
    if "403" in text or "Invalid authentication token" in text or "invalid or incorrect" in text:
        return ClusterError(f"{address} refused the Ray token (403): it is not this cluster's token")
    if "404" in text or "does not exist" in text:
        return NoSuchJob(f"no such job on {address}")
    if "already exists" in text:
        return JobExists(f"{address} already has a job with that submission id")
    if isinstance(err, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return ClusterError(f"cannot reach a Ray dashboard at {address}")
    return ClusterError(f"{address}: {text.strip().splitlines()[0] if text.strip() else type(err).__name__}")


def connect(address: str):
    """A JobSubmissionClient for `address`, with failures turned into one-line ClusterErrors."""
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as err:  # ConnectionError, RuntimeError (HTTP status), ValueError (address)
        raise _explain(err, address) from None


def _call(address: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        raise _explain(err, address) from None


def entrypoint(run_dir: str, data_dir: str | None, command: str = "run",
               trusted: tuple[str, ...] = ()) -> str:
    args = ["python", "-m", "orchestrator.cli", command, "spec.yaml", "--address", "auto",
            "--run-dir", run_dir]
    if data_dir:
        args += ["--data-dir", data_dir]
    for package in trusted:
        args += ["--trust-module", package]
    return shlex.join(args)


NO_AGENT = "No available agent to submit job"
AGENT_WAIT_S = 120.0  # how long a submission waits for the head's job agent to register


def submit(
    spec: JobSpec, address: str, *, run_dir: str, data_dir: str | None = None,
    submission_id: str | None = None, metadata: dict | None = None,
    trusted: frozenset[str] = frozenset(),
) -> str:
    """Submit one job; returns its Ray job id. The spec was validated by the caller.

    Trusted packages (`python` models' factories) travel as `py_modules` beside stillhouse's
    own, and the entrypoint trusts them again on the cluster."""
    import specs
    from trainers.models import trusted_package_dirs
    from trainers.tracking import git_revision

    client = connect(address)
    root = Path(specs.__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory(prefix="stillhouse-submit-") as staging:
        (Path(staging) / "spec.yaml").write_text(
            yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
        )
        runtime_env = {
            "working_dir": staging,
            "py_modules": [str(root / name) for name in PACKAGES]
            + trusted_package_dirs(frozenset(trusted)),
            "env_vars": {"PYTHONUNBUFFERED": "1",
                         "STILLHOUSE_GIT_REVISION": git_revision() or "",
                         # the job's Ray Train controller notices a stage's end (or a failed
                         # worker) within 0.5 s instead of its default 2 s poll
                         **JOB_RAY_TRAIN_ENV},
        }
        # A head whose job agent has not registered yet (a fresh `ray start --head`, or one
        # whose agent restarts) answers 500 "No available agent to submit job, please try again
        # later": nothing was submitted, so the same submission is tried again while it says so.
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return client.submit_job(
                    entrypoint=entrypoint(run_dir, data_dir, "sweep" if spec.sweep else "run",
                                          tuple(sorted(trusted))),
                    runtime_env=runtime_env,
                    submission_id=submission_id,
                    metadata={"stillhouse_job": spec.name, **(metadata or {})},
                )
            except Exception as err:
                if NO_AGENT not in str(err) or time.monotonic() > deadline:
                    raise _explain(err, address) from None
                time.sleep(1.0)


def status(address: str, job_id: str, client=None) -> str:
    client = client or connect(address)
    return str(_call(address, client.get_job_status, job_id).value)


def logs(address: str, job_id: str) -> str:
    client = connect(address)
    return _call(address, client.get_job_logs, job_id)


def follow_logs(address: str, job_id: str, out) -> str:
    """Stream a job's logs until it ends; returns its final status."""
    import asyncio

    client = connect(address)
    _call(address, client.get_job_status, job_id)  # unknown id: fail before streaming

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    _call(address, asyncio.run, tail())
    return wait(address, job_id, timeout=60, client=client)


def wait(address: str, job_id: str, timeout: float, poll: float = 1.0, client=None) -> str:
    """Poll until the job ends (or `timeout` passes); one connection for all the polls."""
    client = client or connect(address)
    deadline = time.monotonic() + timeout
    while True:
        state = status(address, job_id, client)
        if state in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll)


def stop(address: str, job_id: str) -> bool:
    client = connect(address)
    return bool(_call(address, client.stop_job, job_id))


def list_jobs(address: str) -> list[dict]:
    client = connect(address)
    jobs = _call(address, client.list_jobs)
    return [
        {"job_id": j.submission_id, "status": str(j.status.value),
         "name": (j.metadata or {}).get("stillhouse_job", ""), "start_time": j.start_time,
         "entrypoint": j.entrypoint}
        for j in jobs
    ]
