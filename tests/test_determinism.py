"""`deterministic: true` (the default): the same spec and seed give the same figures on the same
machine. Two runs of one digits job (2 teacher replicas answering 2 workers online, bf16, ZeRO 1,
two pruning rounds) into two run dirs: every phase's losses, accuracies, thresholds and masks are
equal, and the compressed files are byte for byte the same. Bit equality is the claim here: the
same machine, thread counts, batches and kernels on both sides, nothing left to chance."""

from __future__ import annotations

import hashlib
import json

import pytest

from test_job_ray import quick_digits_spec, run_cli, write_spec

pytestmark = pytest.mark.ray

TIMING = {"wall_seconds", "samples_per_s", "rank_checks"}  # clocks and node ids, not results


def _run(tmp_path, spec: dict, name: str) -> tuple[dict, list[dict], bytes]:
    run_dir = tmp_path / name
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metas = [json.loads(p.read_text())["meta"]
             for p in sorted((run_dir / "checkpoints").glob("*/COMPLETE.json"))]
    digests = [{c["rank"]: c["mask_digest"] for c in m["rank_checks"]} for m in metas]
    report = json.loads((run_dir / "report.json").read_text())
    compact = (run_dir / "student.compressed.safetensors").read_bytes()
    return report, [{k: v for k, v in m.items() if k not in TIMING} for m in metas] + digests, \
        compact


def test_the_same_spec_twice_gives_the_same_figures(tmp_path):
    spec = quick_digits_spec("determinism", "det", epochs=3, rounds=2, precision="bf16")
    assert "deterministic" not in spec  # the default
    first, first_phases, first_file = _run(tmp_path, spec, "a")
    second, second_phases, second_file = _run(tmp_path, spec, "b")
    assert first_phases == second_phases
    for key in ("teacher", "dense_student", "rounds", "final"):
        assert first[key] == second[key], key
    assert [s["accuracy"] for s in first["stages"]] == [s["accuracy"] for s in second["stages"]]
    assert hashlib.sha256(first_file).hexdigest() == hashlib.sha256(second_file).hexdigest()
