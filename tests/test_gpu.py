"""On a CUDA GPU: the engine, the pruning masks, the teacher and a whole job on the device.

Marked `gpu`: where torch sees no CUDA device they are skipped, with that reason (tests/conftest.py).
`bench/gpu_check.py` runs them on a GPU machine, with a throughput comparison. The same code paths
run on the CPU in tests/test_engine.py, test_zero3_engine.py, test_sharded_pruning.py and
test_devices.py; what is checked here is what only a GPU shows: CUDA tensors in every collective
(NCCL takes nothing else), DeepSpeed's CUDA accelerator, fp16 loss scaling on CUDA kernels, and
teacher replicas on their GPU share.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import yaml

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[1]


def _digits_spec(name: str, **overrides) -> dict:
    """The digits job of tests/test_job_ray.py (not imported: it needs wandb, which a GPU
    machine's image may lack)."""
    spec = {
        "name": name, "seed": 0, "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [128, 128]}},
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}, "epochs": 12, "lr": 0.005,
                    "batch_size": 32},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"target_sparsity": 0.75, "rounds": 3, "finetune_epochs": 2,
                    "schedule": {"kind": "geometric"}},
        "wandb": {"mode": "disabled"},
    }
    spec.update(overrides)
    return spec


def _run(tmp_path: Path, spec: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    """`stillhouse run` on the spec, in its own process; run dir `tmp_path/run`."""
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(tmp_path / "spec.yaml"),
         "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
        timeout=timeout)


@pytest.fixture(scope="module")
def nccl_group():
    """A one-rank NCCL group on GPU 0, as Ray Train sets up for a one-worker group."""
    from trainers.engine import set_distributed_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.cuda.set_device(0)
    set_distributed_env(0, 0, 1, 1, torch.device("cuda", 0))
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(autouse=True)
def restore_linear():
    """ZeRO 3 replaces `torch.nn.functional.linear` process-wide (see tests/test_engine.py)."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def _engine(precision: str, zero_stage: int, offload: str = "none"):
    from specs import parse_spec
    from trainers.engine import DistillEngine
    from trainers.models import MLP

    spec = parse_spec({
        "name": "gpu", "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}},
        "precision": precision,
        "deepspeed": {"zero_stage": zero_stage, "offload_optimizer": offload,
                      "param_persistence_threshold": 0},
        "resources": {"student_gpus": 1, "student_workers": 1},
    })
    torch.manual_seed(0)
    return DistillEngine(MLP(64, [32, 16], 10), spec, lr=0.05, micro_batch=16,
                         weight_decay=0.01, grad_clip=1.0, world_size=1)  # device: the spec's


def _batch():
    return torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.randn(16, 10)


@pytest.mark.parametrize("precision,zero_stage,offload", [
    ("fp16", 1, "none"), ("fp16", 3, "none"), ("bf16", 3, "none"), ("bf16", 2, "cpu"),
    ("bf16", 3, "cpu"), ("bf16_autocast", 0, "none"), ("fp32", 3, "none"),
])
def test_engine_trains_and_prunes_on_the_gpu(nccl_group, precision, zero_stage, offload):
    from deepspeed.accelerator import get_accelerator

    from trainers.pruning import GlobalMagnitudePruner

    engine = _engine(precision, zero_stage, offload)
    assert engine.device.type == "cuda" and get_accelerator().device_name() == "cuda"
    where = [p.ds_tensor.device if zero_stage == 3 else p.device for p in engine.prunable.values()]
    assert all(d.type == "cuda" for d in where)
    for _ in range(3):
        assert engine.train_step(*_batch(), 2.0, 0.5) is not None  # CPU batches, moved
    weights = engine.full_fp32_weights(list(engine.prunable))
    expected, threshold = GlobalMagnitudePruner.compute_masks(weights, 0.6)
    # exact: the threshold is one weight's magnitude, the same float32 on both sides; from the
    # shards under ZeRO 3, through an NCCL broadcast otherwise
    assert engine.prune_to(0.6) == threshold
    for name, mask in expected.items():
        assert engine.masks[name].device.type == "cuda"
        assert torch.equal(engine.masks[name].cpu(), mask), name
    for _ in range(5):
        engine.train_step(*_batch(), 2.0, 0.5)
    assert engine.masked_nonzero() == (0, 0)
    after = engine.full_fp32_weights()
    assert all(int(torch.count_nonzero(after[n][~m])) == 0 for n, m in expected.items())
    logits = engine.predict(torch.randn(8, 1, 8, 8))
    assert logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.shape == (8, 10)


def test_fp16_overflow_steps_are_skipped_and_counted_on_the_gpu(nccl_group):
    """As tests/test_engine.py checks on the CPU: inputs of 300 overflow the scaled fp16
    gradients at DeepSpeed's initial scale 2^16; the steps are skipped until the scale is low
    enough, the weights unchanged meanwhile."""
    engine = _engine("fp16", 3)
    x, y, t = _batch()
    engine.prune_to(0.5)
    weights = engine.full_fp32_weights()
    assert engine.train_step(x * 300, y, t, 2.0, 0.5) is not None
    assert engine.overflow_steps == 1
    for name, weight in engine.full_fp32_weights().items():
        assert torch.equal(weight, weights[name]), name
    steps = 1
    while engine.overflow_steps == steps and steps < 30:
        engine.train_step(x * 300, y, t, 2.0, 0.5)
        steps += 1
    assert 1 < engine.overflow_steps < steps < 30
    assert engine.masked_nonzero() == (0, 0)


def test_sharded_masks_from_cuda_pieces():
    from test_sharded_pruning import CASES, flat_pieces, make_case
    from trainers.pruning import GlobalMagnitudePruner, sharded_magnitude_masks

    for seed, with_previous, sparsity in CASES:
        weights, previous = make_case(seed, with_previous)
        names = list(weights)
        flat = torch.cat([weights[n].flatten() for n in names]).cuda()
        prev = None if previous is None else torch.cat([previous[n].flatten() for n in names]).cuda()
        pieces = [p for rank in flat_pieces(weights, 3, seed, "random") for p in rank]
        masks, threshold = sharded_magnitude_masks(
            [flat[o : o + n] for o, n in pieces], [o for o, _ in pieces], sparsity,
            None if prev is None else [prev[o : o + n] for o, n in pieces])
        ref, ref_threshold = GlobalMagnitudePruner.compute_masks(weights, sparsity, previous)
        ref_flat = torch.cat([ref[n].flatten() for n in names])
        for (o, n), mask in zip(pieces, masks):
            assert mask.device.type == "cuda" and torch.equal(mask.cpu(), ref_flat[o : o + n])
        assert threshold == ref_threshold  # exact: one weight's magnitude (no NaN here)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (one NCCL rank each)")
def test_two_gpu_nccl_zero3_prunes_from_shards_and_resumes_exactly(tmp_path):
    import torch.multiprocessing as mp

    from test_zero3_engine import _rank_main, check_results

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path), 1), nprocs=2, join=True)
    check_results(tmp_path)


def test_teacher_answers_from_the_gpu_as_on_the_cpu():
    from trainers.models import MLP
    from trainers.teacher_server import TeacherServer

    torch.manual_seed(0)
    model = MLP(64, [128, 128], 10)
    x = np.random.default_rng(0).standard_normal((256, 1, 8, 8)).astype(np.float32)
    cpu = TeacherServer(MLP(64, [128, 128], 10).requires_grad_(False), "fp32")
    cpu.model.load_state_dict(model.state_dict())
    gpu = TeacherServer(model, "fp32", device=torch.device("cuda", 0))
    assert next(gpu.model.parameters()).device.type == "cuda"
    out = gpu.logits(x)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    # fp32 on both; TF32 is off by default for matmuls, so only summation order differs
    np.testing.assert_allclose(out, cpu.logits(x), rtol=1e-4, atol=1e-4)
    bf16 = TeacherServer(model, "bf16", device=torch.device("cuda", 0)).logits(x)
    np.testing.assert_allclose(bf16, out, atol=0.1)  # bf16: 8 mantissa bits, |logits| < 2


def test_more_gpus_than_this_machine_has_exits_2_before_ray_starts(tmp_path):
    count = torch.cuda.device_count()
    raw = _digits_spec("too-many-gpus", resources={
        "student_workers": 1, "student_gpus": 1, "teacher_replicas": count, "teacher_gpus": 1.0,
        "student_cpus": 0.5, "teacher_cpus": 0.5})
    started = time.monotonic()
    result = _run(tmp_path, raw, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"asks for {count + 1} GPUs" in result.stderr
    assert f"this machine has {count}" in result.stderr
    assert not (tmp_path / "run").exists() and time.monotonic() - started < 60


@pytest.mark.ray
def test_gpu_job_end_to_end(tmp_path, digits_teacher):
    """The digits job on one GPU: one worker (half the GPU, fp16, ZeRO 3, every parameter
    partitioned) and two teacher replicas of a quarter GPU each, through `stillhouse run`."""
    from safetensors.numpy import load_file

    spec = _digits_spec(
        "digits-gpu", teacher=digits_teacher, precision="fp16",
        deepspeed={"zero_stage": 3, "param_persistence_threshold": 0},
        resources={"student_workers": 1, "student_gpus": 0.5, "student_cpus": 1.0,
                   "teacher_replicas": 2, "teacher_gpus": 0.25, "teacher_cpus": 1.0})
    spec["student"]["epochs"] = 4
    run_dir = tmp_path / "run"
    result = _run(tmp_path, spec)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metas = [json.loads((f / "COMPLETE.json").read_text())["meta"]
             for f in sorted((run_dir / "checkpoints").glob("student-*"))]
    assert len(metas) == 4
    for meta in metas:
        assert meta["device"] == "cuda" and meta["precision"] == "fp16"
        assert meta["zero_stage"] == 3 and "skipped_overflow_steps" in meta
        assert meta["skipped_overflow_steps"] < meta["steps"]  # the scale settles, training goes on
        (check,) = meta["rank_checks"]
        assert check["masked_nonzero_module"] == 0 and check["masked_nonzero_master"] == 0
    final = metas[-1]
    assert final["prunable_params"] - final["prunable_nonzero"] == round(0.75 * final["prunable_params"])
    weights = load_file(str(run_dir / "checkpoints" / "student-03-round3" / "model.safetensors"))
    masks = load_file(str(run_dir / "checkpoints" / "student-03-round3" / "masks.safetensors"))
    assert all(np.count_nonzero(weights[n][~m]) == 0 for n, m in masks.items())
    report = json.loads((run_dir / "report.json").read_text())
    assert report["final"]["accuracy"] > 0.8
