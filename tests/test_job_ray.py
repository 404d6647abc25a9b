"""Integration tests: real local Ray clusters, real DeepSpeed engines, real offline W&B files.

Each job runs through the `stillhouse` command as a user would, in its own process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from safetensors.numpy import load_file

from wandb_file import history_rows, job_history, read_records, run_info

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
STILLHOUSE = [sys.executable, "-m", "orchestrator.cli"]


def digits_spec(zero_stage: int, group: str, **overrides) -> dict:
    spec = {
        "name": f"digits-test-z{zero_stage}",
        "seed": 0,
        "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [128, 128]},
                    "epochs": 8, "lr": 0.003, "batch_size": 32},
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}, "epochs": 12, "lr": 0.005,
                    "batch_size": 32},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"target_sparsity": 0.75, "rounds": 3, "finetune_epochs": 2,
                    "schedule": {"kind": "geometric"}},
        "precision": "bf16",
        "deepspeed": {"zero_stage": zero_stage},
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "student_workers": 2,
                      "student_cpus": 0.5},
        "wandb": {"mode": "auto", "group": group, "log_every_steps": 5},
    }
    spec.update(overrides)
    return spec


def quick_digits_spec(name: str, group: str, epochs: int = 4, rounds: int = 1, **overrides) -> dict:
    """A short digits job (target sparsity 0.5) for tests about everything around training."""
    spec = digits_spec(1, group=group, name=name, **overrides)
    if spec["teacher"]["kind"] == "train":
        spec["teacher"]["epochs"] = epochs
    spec["student"]["epochs"] = epochs
    spec["pruning"] = {"target_sparsity": 0.5, "rounds": rounds, "finetune_epochs": 1,
                       "schedule": {"kind": "oneshot" if rounds == 1 else "geometric"}}
    return spec


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def session_processes(sid: int) -> list[psutil.Process]:
    """Every process of session `sid` (a job started with `start_new_session=True`)."""
    left = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                left.append(p)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            pass
    return left


def assert_nothing_left(sid: int, timeout: float = 30) -> None:
    """No process of the job's session (raylet, GCS, workers, replicas, wandb) outlives it."""
    deadline = time.monotonic() + timeout
    while session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not session_processes(sid), [p.cmdline() for p in session_processes(sid)]


def run_cli(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(STILLHOUSE + args, cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def check_pruned_checkpoints(run_dir: Path, rounds: int, quantize: bool = False) -> list[dict]:
    """Every student checkpoint: masks equal on all ranks, pruned weights exactly zero (also in
    the quantized fine-tuning phase after the rounds, when there is one)."""
    metas = []
    for folder in sorted((run_dir / "checkpoints").glob("student-*")):
        meta = json.loads((folder / "COMPLETE.json").read_text())["meta"]
        metas.append(meta)
        checks = meta["rank_checks"]
        assert [c["rank"] for c in checks] == [0, 1]
        if meta["kind"] in ("prune", "quantize"):
            assert len({c["mask_digest"] for c in checks}) == 1, "workers hold different masks"
            for c in checks:  # after the round's bf16 fine-tuning steps, on every worker
                assert c["masked_nonzero_module"] == 0 and c["masked_nonzero_master"] == 0, c
            weights = load_file(str(folder / "model.safetensors"))
            masks = load_file(str(folder / "masks.safetensors"))
            pruned = sum(int((~m).sum()) for m in masks.values())
            assert pruned == round(meta["target_sparsity"] * meta["prunable_params"])
            for name, mask in masks.items():
                assert np.count_nonzero(weights[name][~mask]) == 0, name
    assert len(metas) == 1 + rounds + int(quantize)
    return metas


def test_digits_job_end_to_end(tmp_path):
    """2 teacher replicas, 2 DeepSpeed workers (bf16, ZeRO 1), 3 rounds; report and W&B files."""
    spec = digits_spec(1, group="e2e-group")
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["teacher"]["accuracy"] > 0.9 and report["teacher"]["params"] > 0
    assert report["dense_student"]["accuracy"] > 0.85
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    targets = [r["target_sparsity"] for r in report["rounds"]]
    assert targets == sorted(targets) and targets[-1] == 0.75
    for r in report["rounds"]:
        assert set(r) >= {"round", "target_sparsity", "sparsity", "accuracy", "nonzero_params"}
    final = report["final"]
    assert final["sparsity"] == pytest.approx(0.75, abs=1e-3)
    assert final["nonzero_params"] < 0.3 * final["dense_params"]
    assert final["accuracy"] > 0.8
    assert set(final["layer_sparsity"]) == {"net.0.weight", "net.2.weight", "net.4.weight"}

    check_pruned_checkpoints(run_dir, rounds=3)
    for line in ("[student] student-02-round2", "epoch 2/2", "samples/s", "final: accuracy"):
        assert line in result.stdout

    runs = {}
    for path in (run_dir / "wandb").glob("offline-run-*/run-*.wandb"):
        records = read_records(path)
        info = run_info(records)
        runs[info["job_type"]] = (info, history_rows(records), records)
    assert set(runs) == {"driver", "teacher-workers", "student-workers"}
    assert {info["group"] for info, _, _ in runs.values()} == {"e2e-group"}
    _, student_rows, _ = runs["student-workers"]
    keys = set().union(*student_rows)
    assert {"train/loss", "train/kd", "train/ce", "train/lr", "train/samples_per_s",
            "eval/accuracy", "prune/sparsity", "prune/round"} <= keys
    assert all(np.isfinite(r["train/loss"]) for r in student_rows if "train/loss" in r)
    driver_info, driver_rows, _ = runs["driver"]
    config = driver_info["config"]
    assert config["spec_hash"] == report["spec_hash"] and len(config["job_id"]) == 12
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    assert config["git_revision"] == (revision or None)
    logged = [r.artifact for r in runs["driver"][2] if r.WhichOneof("record_type") == "artifact"]
    tables = [a for a in logged if a.type == "run_table"]  # the report's stage table
    assert len(tables) == 1 and "reportstages" in tables[0].name
    artifacts = [a for a in logged if a.type != "run_table"]
    assert [(a.name, a.type) for a in artifacts] == [("digits-test-z1-student", "model")]
    assert {f.path for f in artifacts[0].manifest.contents} == {
        "student.safetensors", "student-masks.safetensors", "student.compressed.safetensors",
        "student.compressed.pt2", "report.json"}
    plots = [r for r in driver_rows if "report/accuracy_vs_size/_type" in r]  # report plots
    assert len(plots) == 1 and plots[0]["report/accuracy_vs_size/_type"] == "image-file"
    assert plots[0]["report/accuracy_vs_sparsity/_type"] == "image-file"
    assert plots[0]["report/accuracy_vs_size/format"] == "png"
    round_rows = [r for r in driver_rows if "round/accuracy" in r]
    assert [r["round/sparsity"] for r in round_rows] == [r["sparsity"] for r in report["rounds"]]


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the job and every process it started (its embedded Ray cluster included)."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    psutil.wait_procs(tree, timeout=30)


WANDB_SECRET = "0123456789abcdef0123456789abcdef01234567"  # planted, shaped like a W&B key
RAY_SECRET = "planted-ray-token-9c2e7d"


def _env_with_secrets() -> dict:
    """W&B key and Ray token set, as on a user's machine: neither may reach any written file."""
    env = _env()
    env.update(WANDB_API_KEY=WANDB_SECRET, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=RAY_SECRET)
    return env


def test_killed_job_resumes_after_last_finished_round(tmp_path):
    """bf16 + ZeRO 2: kill the job after round 1 commits; the rerun skips what was done.

    Runs with a W&B key and a Ray token in the environment (W&B offline by the spec), and then
    checks that neither appears in any file the job wrote.
    """
    spec = digits_spec(2, group="resume-group",
                       wandb={"mode": "offline", "group": "resume-group", "log_every_steps": 10})
    spec_path = write_spec(tmp_path, spec)
    run_dir = tmp_path / "run"
    marker = run_dir / "checkpoints" / "student-01-round1" / "COMPLETE.json"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(STILLHOUSE + ["run", str(spec_path), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=_env_with_secrets(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (run_dir / "spec.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        # one job at a time in a run dir: a second run there is refused, and the first goes on
        second = run_cli(["run", str(spec_path), "--run-dir", str(run_dir)])
        assert second.returncode == 2, second.stderr[-2000:]
        assert "is in use by a running job (pid " in second.stderr
        while not marker.exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # the driver alone, as a user's `kill -9` would
        proc.wait(timeout=30)
        log.close()
    try:  # its embedded cluster, worker groups and wandb processes go down with it
        assert_nothing_left(proc.pid, timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not (run_dir / "report.json").exists()
    # the workers can outlive a killed driver by a moment and commit one more phase
    names = ["student-00-dense", "student-01-round1", "student-02-round2", "student-03-round3"]
    committed = [n for n in names if (run_dir / "checkpoints" / n / "COMPLETE.json").exists()]
    assert committed == names[: len(committed)] and len(committed) >= 2
    done_before = {n: (run_dir / "checkpoints" / n / "COMPLETE.json").stat().st_mtime_ns
                   for n in ["teacher", *committed]}
    metas_before = [json.loads((run_dir / "checkpoints" / n / "COMPLETE.json").read_text())["meta"]
                    for n in committed]

    result = subprocess.run(STILLHOUSE + ["run", str(spec_path), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=_env_with_secrets(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "teacher: done in an earlier run, skipped" in result.stdout
    for i, name in enumerate(committed):  # finished work was not redone or rewritten
        assert f"[student] {name} ({i + 1}/4) epoch" not in result.stdout
    for name, mtime in done_before.items():
        assert (run_dir / "checkpoints" / name / "COMPLETE.json").stat().st_mtime_ns == mtime
    metas = check_pruned_checkpoints(run_dir, rounds=3)
    assert metas[: len(committed)] == metas_before
    if len(committed) < len(names):
        k = len(committed)
        assert f"resuming after {committed[-1]}" in result.stdout
        assert f"[student] {names[k]} ({k + 1}/4) epoch 1/2" in result.stdout
        assert metas[k]["global_step"] == metas_before[-1]["global_step"] + metas[k]["steps"]
    round1 = metas_before[1]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["rounds"][0]["accuracy"] == round1["accuracy"]
    assert report["final"]["sparsity"] == pytest.approx(0.75, abs=1e-3)

    # W&B: across the stopped run and the resumed one, every student step logged exactly once
    logged = [row for row in job_history(run_dir, "student-workers") if "_step" in row]
    steps = [row["_step"] for row in logged]
    assert len(steps) == len(set(steps)), sorted(s for s in steps if steps.count(s) > 1)
    final_step = metas[-1]["global_step"]
    planned = set(range(10, final_step + 1, 10)) | {m["global_step"] for m in metas}
    assert set(steps) == planned
    assert sorted(r["_step"] for r in logged if "eval/accuracy" in r) == \
        [m["global_step"] for m in metas]

    written = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(written) > 20 and any(p.suffix == ".wandb" for p in written)
    for path in written:
        data = path.read_bytes()
        assert WANDB_SECRET.encode() not in data and RAY_SECRET.encode() not in data, path
    for text in (result.stdout, result.stderr, (tmp_path / "first.log").read_text()):
        assert WANDB_SECRET not in text and RAY_SECRET not in text

    # a third run finds everything done and trains nothing
    again = run_cli(["run", str(spec_path), "--run-dir", str(run_dir)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "every phase done in an earlier run, skipped" in again.stdout


def test_too_few_cpus_is_a_clear_error_not_a_hang(tmp_path):
    spec = digits_spec(1, group="cpu", resources={"student_workers": 8, "student_cpus": 1.0})
    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)],
                     timeout=120)
    assert result.returncode == 2
    assert "asks for 9 CPUs" in result.stderr and "student workers x 1" in result.stderr
    assert time.monotonic() - started < 60
    assert not run_dir.exists()


def test_changed_spec_in_same_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(json.dumps({"spec_hash": "0000", "name": "other"}))
    result = run_cli(["run", str(write_spec(tmp_path, digits_spec(1, group="x"))),
                      "--run-dir", str(run_dir)], timeout=120)
    assert result.returncode == 2 and "different spec" in result.stderr
