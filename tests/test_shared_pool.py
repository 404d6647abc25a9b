"""A teacher pool shared by several jobs on one long-lived, token-authenticated cluster."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ray_head import TOKEN, token_env
from trainers.models import MLP

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]

JOB = textwrap.dedent("""
    import json, sys
    import numpy as np, ray
    from specs import parse_spec
    from trainers.teacher_pool import PoolStartError, TeacherPool
    gcs, teacher_file = sys.argv[1], sys.argv[2]
    spec = parse_spec({"name": "sharer", "data": {"kind": "digits"},
        "teacher": {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [32]}, "path": teacher_file},
        "student": {"model": {"kind": "mlp", "hidden": [8]}},
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "shared_pool": "sharedteacher"}})
    ray.init(address=gcs, logging_level="error")
    try:
        pool = TeacherPool.start(spec, teacher_file, (1, 8, 8), 10)
    except PoolStartError as err:
        print(json.dumps({"error": str(err)})); sys.exit(0)
    logits = pool.predict(np.zeros((64, 1, 8, 8), np.float32), batch_size=16)
    print(json.dumps({"stats": pool.stats(), "rows": len(logits)}))
    pool.shutdown()  # a shared pool stays up for the next job
""")


def _job(head, teacher_file: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", JOB, head.gcs, str(teacher_file)], cwd=ROOT,
                         env=token_env(TOKEN), capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _teacher(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    save_file(MLP(64, [32], 10).state_dict(), str(path))
    return path


def test_jobs_share_one_pool_until_it_is_stopped(head, tmp_path):
    teacher = _teacher(tmp_path / "t.safetensors", 0)
    first = _job(head, teacher)
    second = _job(head, teacher)  # another Ray job, after the first has ended
    assert first["rows"] == second["rows"] == 64
    assert [s["pid"] for s in first["stats"]] == [s["pid"] for s in second["stats"]]
    assert sum(s["served"] for s in second["stats"]) == 2 * 64  # the same replicas, still counting

    other = _job(head, _teacher(tmp_path / "other.safetensors", 1))
    assert "serves another teacher" in other["error"]

    stop = subprocess.run([sys.executable, "-m", "orchestrator.cli", "pool", "stop", "sharedteacher",
                           "--ray-address", head.gcs], cwd=ROOT, env=token_env(TOKEN),
                          capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0 and "stopped 2 replicas" in stop.stdout, stop.stderr[-2000:]
    third = _job(head, teacher)  # a fresh pool: new processes
    assert not {s["pid"] for s in third["stats"]} & {s["pid"] for s in first["stats"]}
    subprocess.run([sys.executable, "-m", "orchestrator.cli", "pool", "stop", "sharedteacher",
                    "--ray-address", head.gcs], cwd=ROOT, env=token_env(TOKEN), timeout=120)
