"""Faults inside a running job (issue 6).

F3 + F12: a student worker SIGKILLed in the middle of a pruning round. Ray Train restarts the
worker group (`resources.worker_max_failures`), the new group finds the last committed checkpoint
itself, and the job ends as if nothing happened: the planned number of optimizer steps, the exact
target sparsity, pruned weights still zero, and no process left behind.

F2: the teacher dies more often than its restart budget: the job fails with a one-line cause and
nothing after the failure is marked complete.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time

import psutil
import pytest
import torch

from test_job_ray import ROOT, STILLHOUSE, _env, _kill_tree, assert_nothing_left, \
    check_pruned_checkpoints, quick_digits_spec, write_spec
from trainers.data import epoch_shard
from trainers.export import load_compressed

pytestmark = pytest.mark.ray


def _descendants(root: psutil.Process, text: str) -> list[psutil.Process]:
    """Processes under `root` whose command line contains `text` (Ray names its workers there)."""
    found = []
    for p in root.children(recursive=True):
        try:
            if text in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_worker_killed_mid_round_resumes_with_planned_steps(tmp_path, digits_teacher):
    spec = quick_digits_spec("worker-kill", "faults", epochs=4, rounds=3, teacher=digits_teacher)
    spec["pruning"] = {"target_sparsity": 0.75, "rounds": 3, "finetune_epochs": 3,
                       "schedule": {"kind": "geometric"}}
    spec["resources"] = {"teacher_replicas": 1, "teacher_cpus": 0.5, "student_workers": 2,
                         "student_cpus": 0.5, "worker_max_failures": 1}
    # ternary weights after pruning: the restarted group carries on into that phase too, and the
    # export stores 2 bits per kept weight (the ternary method through the job driver)
    spec["quantization"] = {"method": "ternary", "finetune_epochs": 2}
    spec["wandb"] = {"mode": "disabled"}
    run_dir = tmp_path / "run"
    round1 = run_dir / "checkpoints" / "student-01-round1" / "COMPLETE.json"
    round2 = run_dir / "checkpoints" / "student-02-round2" / "COMPLETE.json"
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            STILLHOUSE + ["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)],
            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    killed_at = None
    try:
        deadline = time.monotonic() + 400
        while not round1.exists():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(0.1)
        # round 2 is training now: kill one worker with SIGKILL, no chance to clean up
        while killed_at is None:
            workers = _descendants(psutil.Process(proc.pid), "RayTrainWorker")
            if workers:
                workers[-1].send_signal(signal.SIGKILL)
                killed_at = time.time()
            assert time.monotonic() < deadline, "no RayTrainWorker process found"
        assert proc.wait(timeout=400) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    out = log_path.read_text()

    assert not round2.exists() or round2.stat().st_mtime > killed_at
    assert json.loads(round2.read_text())["meta"]["world_size"] == 2
    assert "[resume] continuing after checkpoint student-01-round1" in out  # the new group
    assert out.count("[student] student-02-round2 done") == 1

    # every phase trained exactly its planned steps, counted without gaps across the restart
    metas = check_pruned_checkpoints(run_dir, rounds=3, quantize=True)  # exact, masks hold
    assert [m["kind"] for m in metas] == ["dense", "prune", "prune", "prune", "quantize"]
    steps_per_epoch = len(epoch_shard(1347, 32, 0, 0, 0, 2))
    planned = [4, 3, 3, 3, 2]
    assert [m["steps"] for m in metas] == [e * steps_per_epoch for e in planned]
    assert [m["global_step"] for m in metas] == [
        sum(planned[: i + 1]) * steps_per_epoch for i in range(5)]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final"]["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert report["final"]["accuracy"] > 0.8

    # the ternary export: 2 bits per kept weight of the middle layer, one magnitude per row
    model, meta = load_compressed(run_dir / report["export"]["file"])
    info = meta["layout"]["net.2.weight"]
    assert info["kind"] == "ternary" and info["sparse"] and meta["layout"]["net.0.weight"]["kind"] == "int8"
    assert info["bytes"] <= math.ceil(info["nnz"] / 4) + 4 * info["shape"][0] + math.ceil(
        math.prod(info["shape"]) / 8)  # codes, scales, and at most a bitmap of positions
    for row in model.net[2].weight().dequantize():
        live = row[row != 0].abs()
        assert torch.allclose(live, live[:1].expand_as(live), rtol=1e-5)
    assert report["export"]["accuracy"] > 0.8
    assert any(s["name"] == "post-training ternary (no fine-tuning)" for s in report["stages"])

    assert_nothing_left(proc.pid)  # no raylet, worker or replica of this job is left running


def test_teacher_dying_past_its_restart_budget_fails_the_job_cleanly(tmp_path, digits_teacher):
    """F2: the only replica, with no restarts allowed, is killed while the student trains; the
    job fails with a one-line cause, and nothing after the failure is marked complete."""
    spec = quick_digits_spec("teacher-dies", "faults", epochs=30, rounds=1, teacher=digits_teacher)
    spec["resources"] = {"teacher_replicas": 1, "teacher_cpus": 0.5, "teacher_max_restarts": 0,
                         "student_workers": 2, "student_cpus": 0.5, "worker_max_failures": 0}
    spec["wandb"] = {"mode": "disabled"}
    run_dir = tmp_path / "run"
    log_path = tmp_path / "job.log"
    with open(log_path, "w") as out, open(tmp_path / "err.log", "w") as err:
        proc = subprocess.Popen(
            STILLHOUSE + ["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)],
            cwd=ROOT, env=_env(), stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while "[student] student-00-dense (1/2) epoch 1/30" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the student never started"
            time.sleep(0.1)
        (replica,) = _descendants(psutil.Process(proc.pid), "TeacherReplica")
        replica.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == 1, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    stderr = (tmp_path / "err.log").read_text().strip().splitlines()
    assert stderr[-1].startswith("stillhouse: job failed: the student stage failed")
    assert "no teacher replica answered" in stderr[-1] and "teacher_max_restarts" in stderr[-1]
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "student-00-dense" / "COMPLETE.json").exists()
    assert not (checkpoints / "student-01-round1").exists()
    assert not (run_dir / "report.json").exists()
    assert_nothing_left(proc.pid)
