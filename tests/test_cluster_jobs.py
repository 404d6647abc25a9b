"""Submission through the Ray Jobs API to a real, token-authenticated head on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from ray_head import TOKEN, token_env, wait_until_idle
from test_job_ray import quick_digits_spec

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]


def cli(args, token=TOKEN, timeout=600):
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                          env=token_env(token), capture_output=True, text=True, timeout=timeout)


def _small_spec(tmp_path: Path, name: str, teacher: dict, epochs: int = 4) -> Path:
    spec = quick_digits_spec(name, "submitted", epochs=epochs, teacher=teacher)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_submit_follow_and_find_the_report(head, tmp_path, digits_teacher):
    run_dir = tmp_path / "run"
    spec = _small_spec(tmp_path, "submitted-digits", digits_teacher)
    submitted = cli(["submit", str(spec), "--address", head,
                     "--run-dir", str(run_dir)])
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_")

    status = cli(["status", job_id, "--address", head])
    assert status.returncode == 0 and status.stdout.strip() in {"PENDING", "RUNNING", "SUCCEEDED"}
    followed = cli(["logs", job_id, "--follow", "--address", head])
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-2000:]
    assert "stage 4/4 report" in followed.stdout and "final: accuracy" in followed.stdout
    assert cli(["status", job_id, "--address", head]).stdout.strip() == "SUCCEEDED"
    assert "final: accuracy" in cli(["logs", job_id, "--address", head]).stdout

    report = json.loads((run_dir / "report.json").read_text())
    assert report["final"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    listed = cli(["list", "--address", head])
    assert f"{job_id}\tSUCCEEDED\tsubmitted-digits" in listed.stdout
    # the token travels in no file the job wrote, nor in the job's own record
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert TOKEN not in listed.stdout
    available, total = wait_until_idle(head)
    assert available == total == 2.0  # every CPU the job's actors and workers held is back


def test_stop_a_running_job(head, tmp_path, digits_teacher):
    """Stopped while its student workers train (replicas and workers hold CPUs then): the
    driver unwinds at SIGTERM and commits nothing more. The dense phase has 200 epochs, so the
    job is mid-phase when the stop lands, whatever this machine's speed: the test waits for that
    state (the first epoch's line), not for a number of seconds."""
    spec = _small_spec(tmp_path, "to-stop", digits_teacher, epochs=200)
    run_dir = tmp_path / "run"
    submitted = cli(["submit", str(spec), "--address", head, "--run-dir", str(run_dir)])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 300
    while "[student] student-00-dense (1/2) epoch 1/200" not in cli(
            ["logs", job_id, "--address", head]).stdout:
        assert time.monotonic() < deadline, "the student never started"
        time.sleep(1)
    stopped = cli(["stop", job_id, "--address", head])
    assert stopped.returncode == 0
    committed = sorted(p.name for p in (run_dir / "checkpoints").glob("*/COMPLETE.json"))
    deadline = time.monotonic() + 120
    while (state := cli(["status", job_id, "--address", head]).stdout.strip()) not in {
            "STOPPED", "FAILED", "SUCCEEDED"}:
        assert time.monotonic() < deadline
        time.sleep(1)
    assert state == "STOPPED"
    assert "stillhouse: stopped (SIGTERM); nothing more was committed" in cli(
        ["logs", job_id, "--address", head]).stdout
    assert not (run_dir / "report.json").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*/COMPLETE.json")) == committed
    available, total = wait_until_idle(head)
    assert available == total == 2.0  # the stopped job's replicas and workers are gone


def test_requests_without_the_token_are_refused(head):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{head}/api/jobs/", timeout=10)
    assert info.value.code == 401
    wrong = urllib.request.Request(f"{head}/api/jobs/", headers={"Authorization": "Bearer nope"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(wrong, timeout=10)
    assert info.value.code == 403

    missing = cli(["list", "--address", head], token=None)
    assert missing.returncode == 1 and "requires a Ray token" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    bad = cli(["list", "--address", head], token="not-the-token")
    assert bad.returncode == 1 and "refused the Ray token" in bad.stderr


def test_unknown_job_and_unreachable_address_are_one_line_errors(head):
    unknown = cli(["status", "raysubmit_doesnotexist", "--address", head])
    assert unknown.returncode == 1 and unknown.stderr.strip() == f"stillhouse: no such job on {head}"
    dead = cli(["status", "x", "--address", "http://127.0.0.1:9"])
    assert dead.returncode == 1
    assert dead.stderr.strip() == "stillhouse: cannot reach a Ray dashboard at http://127.0.0.1:9"


def test_invalid_spec_is_not_submitted(head, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "bad", "data": {"kind": "digits"}}))
    before = cli(["list", "--address", head]).stdout
    result = cli(["submit", str(bad), "--address", head, "--run-dir", str(tmp_path / "r")])
    assert result.returncode == 2 and "teacher" in result.stderr
    assert cli(["list", "--address", head]).stdout == before
