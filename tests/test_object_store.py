"""F8: the object store under pressure. A logit-cache fill whose input is more than twice the
object store (`object_store_memory` at Ray's 75 MiB floor) spills to disk and still writes every
row exactly as the teacher computes it in-process; the teacher pool answers the same through it."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import save

from specs import parse_spec
from trainers.data import Dataset
from trainers.logit_cache import LogitCache, fill_cache
from trainers.models import MLP
from trainers.teacher_pool import TeacherPool
from trainers.teacher_server import TeacherServer, load_teacher

pytestmark = pytest.mark.ray

STORE_BYTES = 75 * 1024 * 1024  # Ray's minimum object store
SAMPLES = 50_000  # 50k MNIST-shaped fp32 images: 157 MB, more than twice the store


def test_small_object_store_spills_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    teacher_file = tmp_path / "teacher.safetensors"
    teacher_file.write_bytes(save(MLP(784, [64], 10).state_dict()))
    spec = parse_spec({
        "name": "store-pressure", "data": {"kind": "digits"},
        "teacher": {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [64]},
                    "path": str(teacher_file)},
        "student": {"model": {"kind": "mlp", "hidden": [16]}, "epochs": 1},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"enabled": False}, "precision": "fp32",
        "logits": {"mode": "cached", "cache_dir": str(tmp_path / "cache")},
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "student_workers": 1,
                      "student_cpus": 0.5},
        "wandb": {"mode": "disabled"},
    })
    x = np.random.default_rng(0).random((SAMPLES, 1, 28, 28), dtype=np.float32)
    expected = TeacherServer(load_teacher(spec.teacher, teacher_file.read_bytes(), (1, 28, 28), 10),
                             "fp32").logits(x)

    spill_dir = tmp_path / "spill"
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning",
             object_store_memory=STORE_BYTES,
             _system_config={"object_spilling_config": json.dumps(
                 {"type": "filesystem", "params": {"directory_path": str(spill_dir)}})})
    try:
        y = np.zeros(SAMPLES, np.int64)
        folder = fill_cache(spec, teacher_file, Dataset(x, y, x[:10], y[:10], num_classes=10),
                            tmp_path / "cache", "k1")
        from ray._private.internal_api import memory_summary

        stats = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        spilled = re.search(r"Spilled (\d+) MiB, (\d+) objects", stats)
        assert spilled and int(spilled.group(1)) > 0, stats

        pool = TeacherPool.start(spec, teacher_file, (1, 28, 28), 10)
        try:
            through_pool = pool.predict(x[:8192])
        finally:
            pool.shutdown()
    finally:
        ray.shutdown()
    cache = LogitCache.open(folder.parent, "k1", 1)
    assert cache.rows == SAMPLES
    # Every row is there, in its place, and is what the teacher computes. Not bit for bit: the
    # cache's rows come from 1024-row forwards in the actors, `expected` from one 50k-row forward
    # here, and a CPU's GEMM kernels may sum a row's products in another order at another batch
    # size (they do on some machines). 1e-5 of these logits (of order 1) is far below any
    # difference a lost, repeated or misplaced row would make.
    np.testing.assert_allclose(cache.logits(np.arange(SAMPLES)), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(through_pool, expected[:8192], rtol=0, atol=1e-5)
