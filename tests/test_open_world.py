"""A user's own models and data through whole jobs (real Ray, real DeepSpeed, files the tests
write the way their tools' docs show): image folders of PNGs, parquet of PNG bytes or arrays,
IDX files, registry models, a trusted user package, exported teachers; and what goes wrong with
them, each a clear error with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_job_ray import STILLHOUSE, _env, run_cli, write_spec

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import digits_files  # noqa: E402


def _hash_of_all(n: int) -> str:
    from trainers.data import ids_multiset_hash

    return f"{ids_multiset_hash(np.arange(n)) % (1 << 64):016x}"


def test_image_folder_example_timm_teacher_torchvision_student_channels_removed(tmp_path):
    """examples/digits-image-folder.yaml as its comment says to run it: PNGs in class folders,
    resized to 16x16 RGB; a timm ResNet teacher trained in the job; a torchvision ResNet-18
    student with half of every channel group removed; both export files reload and predict
    exactly as the in-memory model, and the shrunk model has a quarter of the weights."""
    data = tmp_path / "data"
    digits_files.write_image_folder(data / "digits-png")
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(ROOT / "examples" / "digits-image-folder.yaml"), "--data-dir",
                      str(data), "--run-dir", str(run_dir)], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["data"]["classes"] == [str(d) for d in range(10)]
    assert report["data"]["image_shape"] == [3, 16, 16] and report["data"]["streamed"]
    assert report["teacher"]["accuracy"] > 0.9  # digits at 16x16: a trained ResNet is near 0.99
    assert report["dense_student"]["accuracy"] > 0.8
    export = report["export"]
    shapes = export["architecture"]["module_shapes"]
    assert export["architecture"]["kind"] == "torchvision" and shapes["conv1"]["out_channels"] == 32
    assert export["params"] < 0.35 * report["dense_student"]["params"]  # 11.2M -> about 2.8M
    assert export["reload_matches"]

    # both files, loaded here as a user would, predict the same classes on the test set
    from trainers.export import load_compressed, load_program, predictions
    from trainers.image_sources import StreamedData

    prepared = StreamedData.open(Path(json.loads((run_dir / "data.json").read_text())["prepared"]))
    compact, meta = load_compressed(run_dir / "student.compressed.safetensors")
    program = torch.export.load(str(run_dir / "student.compressed.pt2")).module()
    pred_compact, labels = predictions(compact, prepared.test_batches())
    pred_program, _ = predictions(program, prepared.test_batches())
    assert torch.equal(pred_compact, pred_program)  # fp32 either way, the same weights
    assert float((pred_compact == labels).float().mean()) == pytest.approx(export["accuracy"])
    assert load_program(run_dir / "student.compressed.pt2")(torch.zeros(1, 3, 16, 16)).shape == (1, 10)

    # the run dir remembers its data: export needs no --data-dir
    again = run_cli(["export", str(run_dir)], timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]


def _parquet_job(tmp_path: Path, teacher: dict, arrays: bool, mode: str) -> tuple[dict, Path]:
    data = digits_files.write_parquet(tmp_path / "pq", arrays=arrays, files=3, train_rows=1346)
    spec = {
        "name": f"pq-{'arrays' if arrays else 'png'}", "seed": 0,
        "data": {"kind": "parquet", "train": str(data / "train-*.parquet"),
                 "test": str(data / "test-*.parquet"), "normalize": "none", "shard_rows": 100,
                 "shuffle_buffer_rows": 300, "cache_dir": str(tmp_path / "prepared")},
        "teacher": teacher,
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}, "epochs": 4, "lr": 0.01,
                    "batch_size": 32},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"target_sparsity": 0.5, "rounds": 1, "finetune_epochs": 1,
                    "schedule": {"kind": "oneshot"}},
        "logits": {"mode": mode, "cache_dir": str(tmp_path / "logits")},
        "precision": "bf16_autocast", "deepspeed": {"zero_stage": 1},
        "resources": {"teacher_replicas": 1, "teacher_cpus": 0.5, "student_workers": 2,
                      "student_cpus": 0.5},
        "wandb": {"mode": "disabled"},
    }
    if mode == "cached":  # the fill's pool of teachers holds every CPU of the embedded cluster
        # (os.cpu_count() of them): reading the shards must not wait for a CPU of its own
        spec["resources"].update(teacher_replicas=2, teacher_cpus=(os.cpu_count() or 1) / 2)
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text()), run_dir


@pytest.mark.parametrize("arrays,mode", [(False, "online"), (True, "cached")],
                         ids=["png-bytes-online", "arrays-cached"])
def test_parquet_over_two_workers_sees_each_sample_once_per_epoch(tmp_path, digits_teacher,
                                                                  arrays, mode):
    """Parquet of PNG bytes (the teacher pool answering the streamed batches) and of pixel
    arrays (the teacher's logits cached by sample id): over 2 workers, every epoch of every
    phase trained on each of the 1346 samples exactly once (count and id hash)."""
    report, run_dir = _parquet_job(tmp_path, digits_teacher, arrays, mode)
    assert report["data"]["train_rows"] == 1346 and report["data"]["streamed"]
    assert report["teacher"]["accuracy"] > 0.9 and report["final"]["accuracy"] > 0.7
    expected = _hash_of_all(1346)
    phases = sorted((run_dir / "checkpoints").glob("student-*/COMPLETE.json"))
    assert len(phases) == 2
    for path in phases:
        meta = json.loads(path.read_text())["meta"]
        assert [e["epoch"] for e in meta["epochs"]] == list(range(len(meta["epochs"])))
        for epoch in meta["epochs"]:
            assert epoch["samples"] == 1346 and epoch["ids_hash"] == expected, (path, epoch)
        # 673 rows per rank in batches of 32: 21 steps per epoch on both ranks
        assert meta["steps"] == 21 * len(meta["epochs"])


def test_a_python_model_runs_only_when_its_package_is_trusted(tmp_path, digits_teacher):
    spec = {
        "name": "user-model", "seed": 0, "data": {"kind": "digits"}, "teacher": digits_teacher,
        "student": {"model": {"kind": "python", "factory": "usermodels.nets:make_student",
                              "kwargs": {"width": 8}}, "epochs": 2, "lr": 0.01, "batch_size": 32},
        "pruning": {"target_sparsity": 0.5, "rounds": 1, "finetune_epochs": 1,
                    "schedule": {"kind": "oneshot"}},
        "precision": "bf16", "resources": {"teacher_replicas": 1, "teacher_cpus": 0.5,
                                           "student_workers": 2, "student_cpus": 0.5},
        "wandb": {"mode": "disabled"},
    }
    path = write_spec(tmp_path, spec)
    env = {**_env(), "PYTHONPATH": str(ROOT / "tests")}  # the user's package is importable here
    env.pop("STILLHOUSE_TRUSTED_MODULES", None)
    untrusted = subprocess.run(STILLHOUSE + ["run", str(path), "--run-dir", str(tmp_path / "no")],
                               cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert untrusted.returncode == 2, untrusted.stderr[-2000:]
    assert "--trust-module usermodels" in untrusted.stderr
    assert "`student.model.factory`" in untrusted.stderr
    assert not (tmp_path / "no").exists()  # refused before Ray started or anything was written

    run_dir = tmp_path / "run"
    trusted = subprocess.run(STILLHOUSE + ["run", str(path), "--run-dir", str(run_dir),
                                           "--trust-module", "usermodels"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert trusted.returncode == 0, trusted.stdout[-3000:] + trusted.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["export"]["architecture"]["factory"] == "usermodels.nets:make_student"
    assert report["final"]["accuracy"] > 0.5  # a small CNN after 3 epochs of 8x8 digits


def _exported_teacher(path: Path, fmt: str) -> tuple[Path, torch.nn.Module]:
    """A third party's CNN for 8x8 digits, trained briefly in plain torch and exported as torch's
    docs show (dynamic batch for torch.export; tracing for TorchScript)."""
    from specs.job import DigitsData
    from trainers.data import load_digits

    data = load_digits(DigitsData(kind="digits"), seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(16 * 64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    model.eval()
    example = x[:4]
    if fmt == "torch_export":
        program = torch.export.export(model, (example,),
                                      dynamic_shapes={"input": {0: torch.export.Dim("batch")}})
        torch.export.save(program, str(path))
    else:
        torch.jit.save(torch.jit.trace(model, example), str(path))
    return path, model


@pytest.mark.parametrize("fmt,suffix", [("torch_export", "pt2"), ("torchscript", "pt")])
def test_exported_teacher_serves_a_whole_job(tmp_path, fmt, suffix):
    """The program is served by the teacher pool for every request the job sends (grouped
    training rows, test batches with a tail, the features-free logits) and scores the test set
    as it does in this process."""
    from specs.job import DigitsData
    from trainers.data import load_digits

    teacher_file, model = _exported_teacher(tmp_path / f"teacher.{suffix}", fmt)
    data = load_digits(DigitsData(kind="digits"), seed=0)
    with torch.no_grad():
        expected = float((model(torch.from_numpy(data.x_test)).argmax(-1)
                          == torch.from_numpy(data.y_test)).float().mean())
    spec = {
        "name": f"exported-{fmt}", "seed": 0, "data": {"kind": "digits"},
        "teacher": {"kind": "exported", "path": str(teacher_file), "format": fmt},
        "student": {"model": {"kind": "mlp", "hidden": [32]}, "epochs": 4, "lr": 0.01,
                    "batch_size": 32},
        "pruning": {"enabled": False}, "precision": "fp32",
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "teacher_request_rows": 100,
                      "student_workers": 1, "student_cpus": 1.0},
        "wandb": {"mode": "disabled"},
    }
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    # the pool batches test rows differently from this process's one forward: float sums may
    # differ in their last bits, so at most one of the 450 predictions may flip
    assert abs(report["teacher"]["accuracy"] - expected) <= 1 / 450
    assert report["dense_student"]["accuracy"] > 0.8


def test_idx_files_of_another_set_and_a_wrong_md5(tmp_path):
    """IDX files that are not MNIST are accepted by `idx` (with or without md5 sums); one whose
    md5 differs from the spec's is refused before Ray starts."""
    data = tmp_path / "data"
    digits_files.write_idx(data / "digits-idx")
    example = ROOT / "examples" / "digits-idx.yaml"
    plan = run_cli(["plan", str(example), "--data-dir", str(data)], timeout=120)
    assert plan.returncode == 0, plan.stderr[-2000:]
    assert "1,347 training images of shape (1, 16, 16), 10 classes" in plan.stdout
    spec = yaml.safe_load(example.read_text())
    spec["data"]["md5"]["train-images-idx3-ubyte.gz"] = "0" * 32
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--data-dir", str(data),
                      "--run-dir", str(tmp_path / "run")], timeout=120)
    assert result.returncode == 2
    assert "train-images-idx3-ubyte.gz: md5 of the uncompressed file is 3bcf" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["unreadable", "mixed sizes"])
def test_bad_images_are_found_before_training(tmp_path, damage):
    """A file that is no image, or images of another size without `image_size`: exit 2 while the
    data is prepared, before any training, naming the file; nothing committed."""
    from PIL import Image

    data = digits_files.write_image_folder(tmp_path / "png", limit=60)
    victim = sorted((data / "train" / "4").glob("*.png"))[0]
    if damage == "unreadable":
        victim.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image decoder can read")
    else:
        Image.new("L", (12, 12)).save(victim)
    spec = {
        "name": "bad-images", "data": {"kind": "image_folder", "train": str(data / "train"),
                                       "test": str(data / "test")},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}, "epochs": 1,
                    "batch_size": 8},
        "student": {"model": {"kind": "mlp", "hidden": [8]}, "epochs": 1, "batch_size": 8},
        "resources": {"teacher_replicas": 1, "student_workers": 1, "student_cpus": 1.0},
        "wandb": {"mode": "disabled"},
    }
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)],
                     timeout=300)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert victim.name in result.stderr
    assert ("not a readable image" if damage == "unreadable" else "need `data.image_size`") \
        in result.stderr
    assert "Traceback" not in result.stderr
    assert not (run_dir / "checkpoints").exists() or not any((run_dir / "checkpoints").iterdir())
