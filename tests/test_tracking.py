"""W&B unreachable (issue 6, F9): an online run falls back to offline files within the spec's
`wandb.init_timeout_s`, logging goes on, and the API key is written nowhere. Real wandb, in a
subprocess so that its process-wide settings start clean."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from wandb_file import history_rows, read_records

ROOT = Path(__file__).resolve().parents[1]
SECRET = "0123456789abcdef0123456789abcdef01234567"


def test_unreachable_server_falls_back_to_offline(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        from pathlib import Path
        from specs import parse_spec
        from trainers.tracking import Tracker
        spec = parse_spec({{"name": "t", "data": {{"kind": "digits"}},
            "teacher": {{"kind": "train", "model": {{"kind": "mlp", "hidden": [8]}}}},
            "student": {{"model": {{"kind": "mlp", "hidden": [8]}}}},
            "wandb": {{"mode": "auto", "init_timeout_s": 5}}}})
        tracker = Tracker.start(spec, Path({str(tmp_path)!r}), job_type="driver", name="t",
                                config={{"k": 1}})
        print("MODE", tracker.mode)
        for step in range(3):
            tracker.log({{"loss": 1.0 / (step + 1)}}, step=step)
        tracker.finish()
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_API_KEY": SECRET,
           "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MODE offline" in result.stdout
    assert "W&B unreachable" in result.stdout and "logging offline" in result.stdout
    assert elapsed < 60  # bounded by init_timeout_s, not wandb's 90 s default per retry loop
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in history_rows(read_records(run_file)) if "loss" in r]
    assert [r["loss"] for r in rows] == [1.0, 0.5, 1.0 / 3]
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in result.stdout + result.stderr


def test_committed_rows_a_stopped_run_never_wrote_are_logged_once(tmp_path):
    """A run killed between a phase's commit and its W&B logging: the next run of the job logs
    that phase's committed rows, and a run after that finds them and logs nothing again."""
    from wandb_file import job_history
    from trainers import checkpoint

    root = tmp_path / "checkpoints"
    checkpoint.begin(root, "student-00-dense")
    rows = [{"step": s, "row": {"train/loss": 1.0 / s}} for s in (10, 20, 30)]
    rows[-1]["row"]["eval/accuracy"] = 0.5
    (checkpoint.partial_path(root, "student-00-dense") / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    checkpoint.commit(root, "student-00-dense", {"global_step": 30})
    script = textwrap.dedent(f"""
        from pathlib import Path
        from specs import parse_spec
        from trainers.worker import stage_tracker
        spec = parse_spec({{"name": "t", "data": {{"kind": "digits"}},
            "teacher": {{"kind": "train", "model": {{"kind": "mlp", "hidden": [8]}}}},
            "student": {{"model": {{"kind": "mlp", "hidden": [8]}}}},
            "wandb": {{"mode": "offline"}}}})
        stage_tracker(spec, Path({str(tmp_path)!r}), "student", ["student-00-dense"], False,
                      {{}}, "offline").finish()
    """)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)}
    for attempt in range(2):
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr[-3000:]
        assert ("logged 3 W&B rows" in result.stdout) == (attempt == 0), result.stdout
    logged = [r for r in job_history(tmp_path, "student-workers") if "_step" in r]
    assert sorted(r["_step"] for r in logged) == [10, 20, 30]
    assert [r["train/loss"] for r in sorted(logged, key=lambda r: r["_step"])] == [0.1, 0.05, 1 / 30]
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1  # the second run started none
