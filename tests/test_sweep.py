"""A sweep over three target sparsities on digits: table, PNG plot and W&B table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from specs import SpecError, parse_spec
from specs.sweep import expand_sweep
from test_job_ray import _env, digits_spec, quick_digits_spec
from wandb_file import history_rows, read_records, run_info

ROOT = Path(__file__).resolve().parents[1]


def test_grid_expands_to_validated_points():
    spec = parse_spec(digits_spec(1, group="g", sweep={"grid": {
        "pruning.target_sparsity": [0.5, 0.9], "distillation.temperature": [2.0, 4.0, 8.0]}}))
    points = expand_sweep(spec)
    assert len(points) == 6
    assert {(p["pruning.target_sparsity"], p["distillation.temperature"]) for p, _ in points} == {
        (s, t) for s in (0.5, 0.9) for t in (2.0, 4.0, 8.0)}
    for point, point_spec in points:
        assert point_spec.sweep is None and point_spec.wandb.group == "g"
        assert point_spec.pruning.target_sparsity == point["pruning.target_sparsity"]
    assert len({s.name for _, s in points}) == 6


def test_bad_grid_entries_are_reported_with_paths():
    spec = parse_spec(digits_spec(1, group="g", sweep={"grid": {
        "pruning.target_sparsty": [0.5], "pruning.rounds": [0, 2]}}))
    with pytest.raises(SpecError) as info:
        expand_sweep(spec)
    text = str(info.value)
    assert "sweep.grid.pruning.target_sparsty: is not a field" in text
    assert "pruning.rounds" in text and "greater than or equal to 1" in text


@pytest.mark.ray
def test_sweep_over_three_sparsities(tmp_path):
    spec = quick_digits_spec("sweep-test", "sweep-test", epochs=8, rounds=2,
                             sweep={"grid": {"pruning.target_sparsity": [0.5, 0.75, 0.9]}})
    spec["student"]["model"]["hidden"] = [64, 32]  # 6.6k weights: 90% sparse still classifies
    # the points share the teacher, so they also share its cached logits
    spec["logits"] = {"mode": "cached", "cache_dir": str(tmp_path / "cache")}
    spec_path = tmp_path / "sweep.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    run_dir = tmp_path / "sweep"
    result = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(spec_path),
                             "--run-dir", str(run_dir)], cwd=ROOT, env=_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    sweep = json.loads((run_dir / "sweep.json").read_text())
    rows = sweep["rows"]
    assert [r["pruning.target_sparsity"] for r in rows] == [0.5, 0.75, 0.9]
    for r in rows:
        assert r["sparsity"] == pytest.approx(r["pruning.target_sparsity"], abs=1e-3)
        assert 0.5 < r["accuracy"] <= 1.0
    assert rows[0]["nonzero_params"] > rows[1]["nonzero_params"] > rows[2]["nonzero_params"]
    assert sweep["shared_teacher"] is True
    reports = [json.loads((Path(r["run_dir"]) / "report.json").read_text()) for r in rows]
    assert [r["teacher"]["source"] for r in reports] == ["train", "checkpoint", "checkpoint"]
    assert len({r["teacher"]["accuracy"] for r in reports}) == 1  # the same teacher everywhere
    assert not (Path(rows[1]["run_dir"]) / "checkpoints" / "teacher").exists()
    assert len(list((tmp_path / "cache").iterdir())) == 1  # written by point 0, read by all
    assert result.stdout.count("logit cache: wrote") == 1
    assert result.stdout.count("logit cache: reusing") == 2

    table = (run_dir / "sweep.md").read_text()
    assert table.count("\n") == 5 and "pruning.target_sparsity" in table
    png = (run_dir / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    groups, sweep_rows = set(), None
    for path in run_dir.glob("**/offline-run-*/run-*.wandb"):
        records = read_records(path)
        info = run_info(records)
        groups.add(info["group"])
        if info["job_type"] == "sweep":
            sweep_rows = history_rows(records)
    assert groups == {"sweep-test"}
    assert sweep_rows is not None
    logged = {k: v for row in sweep_rows for k, v in row.items()}
    # W&B writes media as nested keys: the table (3 rows) and the plot went to the run
    assert logged["sweep/results/_type"] == "table-file" and logged["sweep/results/nrows"] == 3
    assert logged["sweep/accuracy_vs_sparsity/_type"] == "image-file"
