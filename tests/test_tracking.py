"""W&B unreachable (issue 6, F9): an online run falls back to offline files within the spec's
`wandb.init_timeout_s`, logging goes on, and the API key is written nowhere. Real wandb, in a
subprocess so that its process-wide settings start clean."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from orchestrator.wandb_file import history_rows, read_records

ROOT = Path(__file__).resolve().parents[1]
SECRET = "0123456789abcdef0123456789abcdef01234567"


def test_unreachable_server_falls_back_to_offline(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = textwrap.dedent(f"""
        from pathlib import Path
        from specs import parse_spec
        from orchestrator.tracking import Tracker
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
