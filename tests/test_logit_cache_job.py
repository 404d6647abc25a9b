"""The logit cache in real jobs: filled once by Ray Data, rebuilt for a changed teacher, top-k
training against full-logit training. (Reuse by later jobs with the same teacher: test_sweep.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import ray
from safetensors.torch import load_file, save

from orchestrator.job import _logit_cache
from specs import parse_spec
from test_job_ray import digits_spec, run_cli, write_spec
from trainers.data import load_dataset
from trainers.logit_cache import LogitCache
from trainers.teacher_server import TeacherServer, load_teacher

pytestmark = pytest.mark.ray

# Stated tolerance for top-k (k=3) against full cached logits: final test accuracy on digits'
# 450 test images within 3 points (13 images).
TOPK_ACCURACY_TOLERANCE = 0.03


def _run(tmp_path: Path, name: str, teacher: dict, logits: dict) -> tuple[dict, str]:
    # bf16_autocast here: the last part of the test, a bf16 spec, finds the cache these wrote
    # (the teacher answers in bf16 under both modes)
    spec = digits_spec(1, group="cache", name=name, teacher=teacher, precision="bf16_autocast",
                       logits={**logits, "cache_dir": str(tmp_path / "cache")})
    spec["student"]["epochs"] = 8
    spec["pruning"] = {"enabled": False}
    spec["wandb"] = {"mode": "disabled"}
    folder = tmp_path / name
    folder.mkdir()
    result = run_cli(["run", str(write_spec(folder, spec)), "--run-dir", str(folder / "run")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((folder / "run" / "report.json").read_text()), result.stdout


def test_cache_is_rebuilt_for_a_new_teacher_and_topk_trains_like_full_logits(
    tmp_path, digits_teacher
):
    full, out = _run(tmp_path, "first", digits_teacher, {"mode": "cached"})
    assert "logit cache: wrote" in out
    caches = list((tmp_path / "cache").iterdir())
    assert len(caches) == 1
    manifest = caches[0] / "manifest.json"
    written_at = manifest.stat().st_mtime_ns
    assert json.loads(manifest.read_text())["rows"] == 1347

    # (a second job with the same teacher reusing this cache: tests/test_sweep.py)
    teacher_file = Path(digits_teacher["path"])
    same = digits_teacher

    # top-k logits from the same teacher train a student about as well as the full ones
    topk, out = _run(tmp_path, "topk", same, {"mode": "topk", "top_k": 3})
    assert "logit cache: wrote" in out and "topk" in out
    assert len(list((tmp_path / "cache").iterdir())) == 2
    assert topk["teacher"]["accuracy"] == full["teacher"]["accuracy"]  # the same teacher
    gap = abs(topk["final"]["accuracy"] - full["final"]["accuracy"])
    assert gap <= TOPK_ACCURACY_TOLERANCE, (topk["final"]["accuracy"], full["final"]["accuracy"])

    # a changed teacher gets a cache of its own: the driver's cache step, on a real cluster
    weights = load_file(str(teacher_file))
    weights["net.4.bias"] = weights["net.4.bias"] + 0.5
    changed = save(weights)
    changed_file = tmp_path / "changed-teacher.safetensors"  # the fill's actors load a file
    changed_file.write_bytes(changed)
    spec = parse_spec(digits_spec(1, group="cache", teacher=same, logits={
        "mode": "cached", "cache_dir": str(tmp_path / "cache")}))
    data = load_dataset(spec.data, None, spec.seed)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    try:
        root, key = _logit_cache(spec, changed_file, changed, data, tmp_path / "changed",
                                 frozenset())
        # the unchanged teacher still finds its cache (and leaves it as it was), from a bf16 spec
        assert _logit_cache(spec, teacher_file, teacher_file.read_bytes(), data, tmp_path,
                            frozenset())[1] == caches[0].name
        assert manifest.stat().st_mtime_ns == written_at
    finally:
        ray.shutdown()
    assert key != caches[0].name and len(list((tmp_path / "cache").iterdir())) == 3
    # every row is the teacher's logits for that very sample: the distributed fill kept order
    teacher = TeacherServer(load_teacher(spec.teacher, teacher_file.read_bytes(),
                                         data.image_shape, 10), spec.precision)
    first_cache = LogitCache.open(tmp_path / "cache", caches[0].name, 1)
    everything = np.arange(len(data.y_train))
    assert np.array_equal(first_cache.logits(everything), teacher.logits(data.x_train))
    cache = LogitCache.open(Path(root), key, 1)
    assert not np.allclose(cache.logits(np.arange(8)),
                           LogitCache.open(tmp_path / "cache", caches[0].name, 1).logits(np.arange(8)))


def _phase_meta(run_dir: Path, name: str) -> dict:
    return json.loads((run_dir / "checkpoints" / name / "COMPLETE.json").read_text())["meta"]


def test_teacher_trained_on_shifts_student_on_cached_logits_and_a_student_alone(
    tmp_path, digits_teacher
):
    """Hinton et al.'s MNIST set-up as a job: the teacher trains on shifted images
    (`teacher.augment`), the student learns from cached logits of the images as stored (a cache
    cannot hold per-epoch shifts). Then a student trained alone (`alpha: 0`) never asks the
    teacher: its replicas leave after scoring the teacher, so one worker may take every CPU."""
    spec = digits_spec(1, group="cache", name="shifted-teacher", precision="bf16_autocast",
                       logits={"mode": "cached", "cache_dir": str(tmp_path / "cache")})
    spec["teacher"]["epochs"] = 3
    spec["teacher"]["augment"] = {"random_crop_padding": 1}
    spec["student"]["epochs"] = 3
    spec["pruning"] = {"enabled": False}
    spec["wandb"] = {"mode": "disabled"}
    # the teacher trains on both CPUs (its replicas start after it), the student on one
    spec["resources"] = {"teacher_replicas": 1, "teacher_cpus": 1, "student_workers": 1,
                         "student_cpus": 1, "teacher_training_cpus": 2}
    folder = tmp_path / "shifted"
    folder.mkdir()
    result = run_cli(["run", str(write_spec(folder, spec)), "--run-dir", str(folder / "run")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "logit cache: wrote" in result.stdout
    teacher = _phase_meta(folder / "run", "teacher")
    student = _phase_meta(folder / "run", "student-00-dense")
    assert teacher["augment"] == {"random_crop_padding": 1, "hflip": False}
    assert student["augment"] == {"random_crop_padding": 0, "hflip": False}
    assert (teacher["threads"], student["threads"]) == (2, 1)
    assert (teacher["teacher_logits"], student["teacher_logits"]) == (None, "cache")
    # 3 epochs on shifted 8x8 digits: far above chance (0.1), the bar is loose on purpose
    assert json.loads((folder / "run" / "report.json").read_text())["teacher"]["accuracy"] > 0.5

    # alone: online logits, yet 1 replica x 1 CPU and 1 worker x 2 CPUs fit 2 CPUs, because the
    # replicas have gone before the worker starts
    alone = digits_spec(1, group="cache", name="alone", teacher=digits_teacher,
                        precision="bf16_autocast",
                        distillation={"kind": "hinton", "temperature": 4.0, "alpha": 0.0})
    alone.update(pruning={"enabled": False},
                 resources={"teacher_replicas": 1, "teacher_cpus": 1, "student_workers": 1,
                            "student_cpus": 2},
                 wandb={"mode": "disabled", "log_every_steps": 5})
    alone["student"]["epochs"] = 2
    folder = tmp_path / "alone"
    folder.mkdir()
    result = run_cli(["run", str(write_spec(folder, alone)), "--run-dir", str(folder / "run")])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "logit cache" not in result.stdout
    rows = [json.loads(line)["row"] for line in
            (folder / "run" / "checkpoints" / "student-00-dense" / "metrics.jsonl")
            .read_text().splitlines()]
    trained = [r for r in rows if "train/loss" in r]
    assert trained, rows
    # cross-entropy alone: no distillation term was ever computed
    assert all("train/ce" in r and "train/kd" not in r for r in trained), trained[0]


def test_rounds_fine_tune_on_their_own_augmentation_for_the_epochs_listed(tmp_path, digits_teacher):
    """`pruning.augment` and a `finetune_epochs` list, online with `cache_unaugmented`: the
    dense student learns on the digits as stored from the logit cache, filled before it starts,
    then the rounds fine-tune on shifted digits, whose values travel with each request to the
    replicas so that the teacher answers the batch the student sees, for 1 and then 2 epochs."""
    spec = digits_spec(1, group="augment", name="round-augment", teacher=digits_teacher,
                       precision="bf16_autocast",
                       logits={"mode": "online", "cache_unaugmented": True,
                               "cache_dir": str(tmp_path / "cache")})
    spec["pruning"] = {"target_sparsity": 0.5, "rounds": 2, "finetune_epochs": [1, 2],
                       "schedule": {"kind": "geometric"}, "augment": {"random_crop_padding": 1}}
    spec["wandb"] = {"mode": "disabled"}
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    phases = ["student-00-dense", "student-01-round1", "student-02-round2"]
    metas = [_phase_meta(run_dir, name) for name in phases]
    assert [m["augment"]["random_crop_padding"] for m in metas] == [0, 1, 1]
    assert [m["teacher_logits"] for m in metas] == ["cache", "replicas", "replicas"]
    assert "logit cache: wrote" in result.stdout
    manifest = json.loads(next((tmp_path / "cache").glob("*/manifest.json")).read_text())
    assert (manifest["mode"], manifest["rows"]) == ("cached", 1347)  # whole logits, every row
    assert [len(m["epochs"]) for m in metas] == [spec["student"]["epochs"], 1, 2]
    assert [m["target_sparsity"] for m in metas[1:]] == pytest.approx([1 - 0.5**0.5, 0.5])
    report = json.loads((run_dir / "report.json").read_text())
    # half the weights gone and 3 epochs on 8x8 digits shifted by a pixel, which the teacher
    # never saw (0.82 here after 0.88 dense): far above chance (0.1), the bar is loose on purpose
    assert report["dense_student"]["accuracy"] > 0.8 and report["final"]["accuracy"] > 0.6
