"""ZeRO 3 on a real job: the digits job through the `stillhouse` command (real Ray, real DeepSpeed,
2 workers over gloo, every parameter partitioned), killed after its first pruning round and run
again. Each round ends at exactly its target sparsity with the same masks on both ranks, and the
rerun continues after the last committed round with the masks it committed.
"""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from test_job_ray import (
    ROOT, STILLHOUSE, _env, _kill_tree, assert_nothing_left, check_pruned_checkpoints,
    digits_spec, write_spec,
)

pytestmark = pytest.mark.ray

NAMES = ["student-00-dense", "student-01-round1", "student-02-round2", "student-03-round3"]


def test_zero3_job_prunes_exactly_and_resumes_after_a_kill(tmp_path, digits_teacher):
    spec = digits_spec(
        3, group="zero3", name="digits-zero3", teacher=digits_teacher,
        wandb={"mode": "disabled"},
        # threshold 0: every parameter is partitioned, so nothing is pruned from a whole copy
        deepspeed={"zero_stage": 3, "param_persistence_threshold": 0},
    )
    spec["student"]["epochs"] = 2
    spec["pruning"]["finetune_epochs"] = 1
    spec_path = write_spec(tmp_path, spec)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(STILLHOUSE + ["run", str(spec_path), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while not (ckpt / NAMES[1] / "COMPLETE.json").exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 never committed"
            time.sleep(0.05)
    finally:
        # the driver and every process of its embedded cluster at once, workers included (a
        # killed driver alone leaves its workers seconds in which they commit more rounds)
        _kill_tree(proc)
        log.close()
    assert_nothing_left(proc.pid, timeout=60)
    committed = [n for n in NAMES if (ckpt / n / "COMPLETE.json").exists()]
    # killed between rounds: after round 1 (or, on a slow poll, round 2); round 3 is left
    assert committed in (NAMES[:2], NAMES[:3]), committed
    before = [json.loads((ckpt / n / "COMPLETE.json").read_text())["meta"] for n in committed]

    result = subprocess.run(STILLHOUSE + ["run", str(spec_path), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"resuming after {committed[-1]}" in result.stdout
    for name in committed:  # committed rounds were not trained again
        assert f"[student] {name} (" not in result.stdout

    # every round: exactly round(target * N) pruned, one mask digest on both ranks, no pruned
    # weight nonzero in any rank's module or fp32 master slices, nor in the gathered weights
    metas = check_pruned_checkpoints(run_dir, rounds=3)
    assert metas[: len(committed)] == before
    assert all(m["zero_stage"] == 3 and m["world_size"] == 2 for m in metas)
    k = len(committed)
    assert metas[k]["global_step"] == before[-1]["global_step"] + metas[k]["steps"]
    final = metas[-1]
    assert final["target_sparsity"] == 0.75
    assert final["prunable_params"] - final["prunable_nonzero"] == round(0.75 * final["prunable_params"])
    # the rounds after the resume kept what was pruned before it
    for earlier, later in zip(NAMES[1:], NAMES[2:]):
        kept_before = load_file(str(ckpt / earlier / "masks.safetensors"))
        kept_after = load_file(str(ckpt / later / "masks.safetensors"))
        for name, mask in kept_after.items():
            assert not np.any(mask & ~kept_before[name]), (earlier, later, name)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final"]["sparsity"] == final["sparsity"]
