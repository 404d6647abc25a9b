"""Compression beyond magnitude pruning, through the job driver on a real Ray cluster: QAT int8
after global pruning, k-means weight sharing after global pruning, and feature distillation with
structured channel pruning and binary weights on LeNet-5; each job ends in a compact file that
`stillhouse export` / `report` can rebuild and that reloads exactly. (Ternary weights through the
driver: tests/test_faults.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from specs.job import DigitsData
from test_job_ray import digits_spec, run_cli, write_spec
from trainers.data import load_digits
from trainers.export import accuracy, load_compressed
from trainers.models import LeNet5, count_params

pytestmark = pytest.mark.ray


def _job(tmp_path: Path, spec: dict) -> tuple[dict, str, Path]:
    run_dir = tmp_path / "run"
    result = run_cli(["run", str(write_spec(tmp_path, spec)), "--run-dir", str(run_dir)])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((run_dir / "report.json").read_text()), result.stdout, run_dir


def _contents(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def _reload(run_dir: Path, report: dict):
    """The exported file, loaded on its own, scores what the report says on the test set."""
    data = load_digits(DigitsData(kind="digits"), seed=0)
    model, meta = load_compressed(run_dir / report["export"]["file"])
    acc, _ = accuracy(model, data.x_test, data.y_test)
    assert acc == report["export"]["accuracy"]
    assert meta["manifest"]["spec_hash"] == report["spec_hash"]
    return model, meta


def test_qat_int8_of_a_90_percent_sparse_student_is_ten_times_smaller(tmp_path, digits_teacher):
    spec = digits_spec(1, group="compress", name="qat", teacher=digits_teacher)
    spec["student"] = {"model": {"kind": "mlp", "hidden": [256, 128]}, "epochs": 8, "lr": 0.003,
                       "batch_size": 32}
    spec["pruning"] = {"target_sparsity": 0.9, "rounds": 2, "finetune_epochs": 2,
                       "schedule": {"kind": "geometric"}}
    spec["quantization"] = {"method": "qat", "finetune_epochs": 2}
    spec["wandb"] = {"mode": "offline", "project": "stillhouse", "group": "compress"}
    report, out, run_dir = _job(tmp_path, spec)

    export = report["export"]
    assert export["dense_file_bytes"] / export["compressed_file_bytes"] >= 10.0
    assert export["sparsity"] == pytest.approx(0.9, abs=0.01) and export["bits"] == 8
    assert export["runtime"] == "int8_dynamic" and export["reload_matches"]
    names = [s["name"] for s in report["stages"]]
    assert names[:3] == ["teacher", "dense student", "pruned (fp32, zeros stored)"]
    ptq = next(s for s in report["stages"] if s["name"].startswith("post-training"))
    dense = report["stages"][1]
    # int8 costs little here: QAT within 2 points of the dense student, PTQ measured beside it
    assert export["accuracy"] >= dense["accuracy"] - 0.02
    assert 0.0 < ptq["accuracy"] <= 1.0
    for s in report["stages"]:
        if "latency_ms" in s:
            assert set(s["latency_ms"]) == {"batch_1", "batch_256"}
            assert all(v > 0 for v in s["latency_ms"].values())
    _reload(run_dir, report)
    assert "compressed (90% weight pruned, qat)" in out and "exported student.compressed" in out
    assert {p.name for p in (run_dir / "plots").iterdir()} == {
        "accuracy_vs_sparsity.png", "accuracy_vs_size.png"}

    # `stillhouse export` rebuilds the file from the checkpoints alone: the same tensors and
    # header (safetensors may order the header's metadata keys differently from write to write)
    first = _contents(run_dir / export["file"])
    (run_dir / export["file"]).unlink()
    again = run_cli(["export", str(run_dir)])
    assert again.returncode == 0, again.stderr[-2000:]
    second = _contents(run_dir / export["file"])
    assert first[0] == second[0] and first[1].keys() == second[1].keys()
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])
    shown = run_cli(["report", str(run_dir)])
    assert shown.returncode == 0 and "size vs dense" in shown.stdout
    assert shown.stdout.count("plot: ") == 2

    # bad input: a run dir that is not one, and a damaged compressed file
    missing = run_cli(["report", str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    broken = run_cli(["export", str(tmp_path)])
    assert broken.returncode == 2 and "not a finished run dir" in broken.stderr


def test_kmeans_weight_sharing_of_a_90_percent_sparse_student(tmp_path, digits_teacher):
    """5-bit weight sharing fine-tuned by two DeepSpeed workers (bf16, ZeRO 1: each holds half of
    the fp32 masters): every layer of the file holds at most 32 shared values, exactly the trained
    ones, reloads to the same predictions, and is smaller than the int8 file of the same pruned
    student."""
    from safetensors.torch import load_file

    from specs import load_spec
    from trainers.export import read_compressed, write_compressed
    from trainers.models import build_from_architecture
    from trainers.quantize import layer_kinds, quantize_state, weight_clusters, weight_kinds

    spec = digits_spec(1, group="compress", name="kmeans", teacher=digits_teacher)
    spec["student"] = {"model": {"kind": "mlp", "hidden": [256, 128]}, "epochs": 8, "lr": 0.003,
                       "batch_size": 32}
    spec["pruning"] = {"target_sparsity": 0.9, "rounds": 2, "finetune_epochs": 2,
                       "schedule": {"kind": "geometric"}}
    spec["quantization"] = {"method": "kmeans", "finetune_epochs": 2, "bits": {"linear": 5}}
    spec["wandb"] = {"mode": "offline", "project": "stillhouse", "group": "compress"}
    report, out, run_dir = _job(tmp_path, spec)

    export = report["export"]
    assert export["runtime"] == "fp32" and export["reload_matches"]
    assert export["bits"] == 5 and set(export["layer_bits"].values()) == {5}
    assert export["sparsity"] == pytest.approx(0.9, abs=0.01)
    names = [s["name"] for s in report["stages"]]
    assert names[2:] == ["pruned (fp32, zeros stored)", "post-training kmeans (no fine-tuning)",
                         "compressed (90% weight pruned, kmeans, fp32 runtime)"]
    dense, pruned, ptq = report["stages"][1:4]
    # 5 bits cost little here: within 2 points of the dense student, as int8 QAT is above
    assert export["accuracy"] >= dense["accuracy"] - 0.02
    assert 0.0 < ptq["accuracy"] <= 1.0 and ptq["bits"] == 5
    model, meta = _reload(run_dir, report)

    # the file holds exactly the trained shared values, at most 2^5 per layer
    ckpt = run_dir / "checkpoints"
    trained = load_file(str(ckpt / "student-03-kmeans" / "model.safetensors"))
    masks = {k: v.bool() for k, v in
             load_file(str(ckpt / "student-03-kmeans" / "masks.safetensors")).items()}
    _, stored, _, layout = read_compressed(run_dir / export["file"])
    for name in ("net.0.weight", "net.2.weight", "net.4.weight"):
        assert layout[name]["kind"] == "kmeans5" and layout[name]["codebook"] <= 32
        assert torch.equal(stored[name], trained[name])
        assert len(torch.unique(stored[name][stored[name] != 0])) <= 32
        assert torch.all(stored[name][~masks[name]] == 0)
    # the clusters follow from the committed round-2 checkpoint alone (what a restarted worker
    # group recomputes), and each holds one value after fine-tuning on two ranks
    before = load_file(str(ckpt / "student-02-round2" / "model.safetensors"))
    kinds = layer_kinds(build_from_architecture(meta["architecture"]), "kmeans",
                        load_spec(run_dir / "spec.yaml").quantization.bits)
    clusters = weight_clusters(before, kinds, masks)
    for name, codes in clusters.items():
        assert all(len(torch.unique(trained[name][codes == c])) == 1
                   for c in range(int(codes.max()) + 1)), name
        assert not torch.equal(torch.unique(trained[name][codes >= 0]),
                               torch.unique(quantize_state(before, kinds, masks)[name][codes >= 0]))

    # smaller than int8 codes of the same pruned student (the QAT file's layout: the same
    # positions, one int8 code per kept weight and a float scale per output channel)
    int8_kinds = layer_kinds(model, "dynamic")
    int8 = tmp_path / "int8.safetensors"
    write_compressed(int8, arch=meta["architecture"], masks=masks, runtime="int8_dynamic",
                     state=quantize_state(before, int8_kinds, masks), manifest=meta["manifest"],
                     kinds=weight_kinds(int8_kinds))
    assert export["compressed_file_bytes"] < int8.stat().st_size
    assert "compressed (90% weight pruned, kmeans, fp32 runtime)" in out

    # `stillhouse export` rebuilds the same file from the checkpoints
    first = _contents(run_dir / export["file"])
    (run_dir / export["file"]).unlink()
    again = run_cli(["export", str(run_dir)])
    assert again.returncode == 0, again.stderr[-2000:]
    second = _contents(run_dir / export["file"])
    assert first[0] == second[0] and first[1].keys() == second[1].keys()
    assert all(torch.equal(first[1][k], second[1][k]) for k in first[1])


def test_feature_kd_structured_binary_lenet5(tmp_path, digits_teacher):
    """Feature distillation, structured channel pruning and binary weights in one LeNet-5 job:
    fewer channels and 1-bit weights in the exported file, and a feature term that is learned."""
    from wandb_file import history_rows, read_records, run_info

    spec = digits_spec(1, group="compress", name="binary", teacher=digits_teacher)
    spec["student"] = {"model": {"kind": "lenet5", "padding": 2}, "epochs": 6, "lr": 0.002,
                       "batch_size": 32}
    # LeNet-5's hidden fc layer (500 units, after ReLU) learns the teacher MLP's second hidden
    # layer (128 units) through a learned 500 -> 128 projection
    spec["distillation"] = {"kind": "hinton", "temperature": 4.0, "alpha": 0.7, "features": [
        {"student": "classifier.1", "teacher": "net.3", "weight": 0.5}]}
    spec["pruning"] = {"target_sparsity": 0.5, "rounds": 1, "finetune_epochs": 2,
                       "schedule": {"kind": "oneshot"}, "granularity": "channel", "norm": "l2",
                       "scope": "layer"}
    spec["quantization"] = {"method": "binary", "finetune_epochs": 3}
    spec["wandb"] = {"mode": "offline", "project": "stillhouse", "group": "features",
                     "log_every_steps": 5}
    report, out, run_dir = _job(tmp_path, spec)

    (path,) = [p for p in (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
               if run_info(read_records(p))["job_type"] == "student-workers"]
    feature = [r["train/feature"] for r in history_rows(read_records(path)) if "train/feature" in r]
    assert len(feature) >= 10 and all(f > 0 for f in feature)
    assert sum(feature[-3:]) < 0.8 * sum(feature[:3])  # the feature term is learned
    # the projection is trained and checkpointed with the student, but not part of it
    with safe_open(str(run_dir / "checkpoints" / "student-00-dense" / "kd_proj.safetensors"),
                   framework="pt") as f:
        assert {k: tuple(f.get_tensor(k).shape) for k in f.keys()} == {
            "kd_proj.0.weight": (128, 500), "kd_proj.0.bias": (128,)}

    model, meta = _reload(run_dir, report)
    assert not any(k.startswith("kd_proj") for k in meta["layout"])
    shapes = meta["architecture"]["module_shapes"]  # the full LeNet-5, resized on loading
    widths = [shapes["features.0"]["out_channels"], shapes["features.2"]["out_channels"],
              shapes["classifier.0"]["out_features"]]
    full = LeNet5((1, 8, 8), 10, padding=2)
    assert widths == [10, 25, 250]  # each layer keeps half its channels
    assert report["export"]["params"] < 0.7 * count_params(full)
    assert report["export"]["dense_params"] == count_params(full)
    assert report["stages"][2]["name"] == "pruned (channels removed)"
    # middle layers are binary: 1 bit per weight plus one fp32 scale per output channel
    layout = meta["layout"]
    with safe_open(str(run_dir / report["export"]["file"]), framework="pt") as f:
        for name in ("features.2.weight", "classifier.0.weight"):
            assert layout[name]["kind"] == "binary"
            n = math.prod(layout[name]["shape"])
            stored = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size()
                         for k in f.keys() if k.startswith(name + ":"))
            packed = math.ceil(n / 8) + 4 * layout[name]["shape"][0]
            assert layout[name]["bytes"] == packed, name  # before entropy coding
            assert stored == layout[name]["stored_bytes"] <= packed, name
        assert layout["features.0.weight"]["kind"] == "int8"  # first and last layers stay int8
        assert layout["classifier.2.weight"]["kind"] == "int8"
    weights = dict(model.named_modules())
    assert weights["features.2"].weight.shape[0] == widths[1]
    # a binarized, half-width LeNet-5 still classifies digits
    assert report["export"]["accuracy"] > 0.8
    binarized = model.features[2].weight.detach().reshape(widths[1], -1).abs()
    assert torch.allclose(binarized, binarized[:, :1].expand_as(binarized))
    assert "compressed (50% channel pruned, binary)" in out

