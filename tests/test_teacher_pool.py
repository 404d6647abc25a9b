"""The teacher pool on a real local Ray cluster (in this process)."""

import time

import numpy as np
import pytest
import ray
import torch
from safetensors.torch import save

from specs import parse_spec
from trainers.models import MLP
from trainers.teacher_pool import PoolError, PoolStartError, TeacherPool
from trainers.teacher_server import TeacherServer

pytestmark = pytest.mark.ray


def _spec(deterministic: bool = True, **resources):
    return parse_spec({
        "name": "pool",
        "deterministic": deterministic,
        "data": {"kind": "digits"},
        "teacher": {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [32]}, "path": "t"},
        "student": {"model": {"kind": "mlp", "hidden": [8]}},
        "resources": {"teacher_replicas": 2, "teacher_cpus": 0.5, "prefetch_batches": 3,
                      **resources},
    })


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="warning")
    yield
    ray.shutdown()


def _teacher_file(folder, model) -> str:
    """The teacher's weights in a safetensors file, where the replicas load them from."""
    path = folder / "teacher.safetensors"
    path.write_bytes(save(model.state_dict()))
    return str(path)


def _stream(client, batches: list[np.ndarray], transport: str):
    """The client's stream of logits for `batches`, sent by value, or as row indices into one
    array put into the object store (what a student worker does), one batch or several per
    request."""
    if transport == "values":
        return client.stream(iter(batches))
    source = ray.put(np.concatenate(batches))
    ends = np.cumsum([len(b) for b in batches])
    index_batches = (np.arange(e - len(b), e) for b, e in zip(batches, ends))
    # "grouped": consecutive batches share a request of at least 70 rows, split again on return
    return client.stream_rows(source, index_batches, 70 if transport == "grouped" else 1)


@pytest.mark.parametrize("transport", ["values", "rows", "grouped"])
def test_stream_returns_every_batch_in_order_from_both_replicas(cluster, tmp_path, transport):
    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    spec = _spec()
    pool = TeacherPool.start(spec, _teacher_file(tmp_path, model), (1, 8, 8), 10)
    try:
        rng = np.random.default_rng(0)
        batches = [rng.standard_normal((16 + i, 1, 8, 8)).astype(np.float32) for i in range(24)]
        out = list(_stream(pool.client(), batches, transport))
        reference = TeacherServer(model, "fp32")
        assert len(out) == len(batches)
        for x, logits in zip(batches, out):  # in order: sizes differ per batch
            assert np.allclose(logits, reference.logits(x), atol=1e-5)
        stats = pool.stats()
        assert all(s["served"] > 0 for s in stats)  # load spread over both replicas
        assert sum(s["served"] for s in stats) == sum(len(b) for b in batches)
    finally:
        pool.shutdown()


def test_pool_that_cannot_be_placed_fails_fast(cluster, tmp_path):
    spec = _spec(teacher_cpus=1.5, placement_timeout_s=3)
    torch.manual_seed(0)
    started = time.monotonic()
    with pytest.raises(PoolStartError, match="not up after 3s"):
        TeacherPool.start(spec, _teacher_file(tmp_path, MLP(64, [32], 10)), (1, 8, 8), 10)
    assert time.monotonic() - started < 30
    _assert_all_cpus_back()  # also those of the replica that did start


def _assert_all_cpus_back() -> None:
    """Every CPU of the 2-CPU test cluster is free again (dead and stopped replicas included)."""
    deadline = time.monotonic() + 20
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize("transport", ["values", "rows", "grouped"])
def test_a_replica_killed_mid_stream_loses_and_repeats_nothing(cluster, tmp_path, transport):
    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    pool = TeacherPool.start(_spec(), _teacher_file(tmp_path, model), (1, 8, 8), 10)
    try:
        rng = np.random.default_rng(1)
        batches = [rng.standard_normal((32, 1, 8, 8)).astype(np.float32) for _ in range(40)]
        reference = TeacherServer(model, "fp32")
        pids = [s["pid"] for s in pool.stats()]
        received = []
        client = pool.client()
        for i, logits in enumerate(_stream(client, batches, transport)):
            received.append(logits)
            if i == 10:  # requests are in flight on both replicas right now
                ray.kill(pool.replicas[0], no_restart=False)
        assert len(received) == len(batches)  # every batch once, in order
        assert client.failovers >= 1  # what was in flight on the dead replica went elsewhere
        for x, logits in zip(batches, received):
            assert np.allclose(logits, reference.logits(x), atol=1e-5)
        after = [s["pid"] for s in pool.stats()]  # the killed replica is a new process now
        assert after[0] != pids[0] and after[1] == pids[1]
    finally:
        pool.shutdown()
    _assert_all_cpus_back()


def test_a_pool_that_keeps_dying_fails_with_a_clear_error(cluster, tmp_path):
    torch.manual_seed(0)
    spec = _spec(teacher_replicas=1, teacher_max_restarts=0)
    pool = TeacherPool.start(spec, _teacher_file(tmp_path, MLP(64, [32], 10)), (1, 8, 8), 10)
    try:
        batches = (np.zeros((8, 1, 8, 8), np.float32) for _ in range(10))
        stream = pool.client().stream(batches)
        next(stream)
        ray.kill(pool.replicas[0], no_restart=True)
        with pytest.raises(PoolError, match="no teacher replica answered after"):
            list(stream)
    finally:
        pool.shutdown()
    _assert_all_cpus_back()


def test_requests_from_several_students_share_forwards(cluster, tmp_path):
    import threading

    torch.manual_seed(0)
    model = MLP(64, [32], 10)
    # coalescing is what this test is about: on only when runs need not be bit-reproducible
    # (a deterministic job's replica answers each request with one forward of its own)
    spec = _spec(deterministic=False, teacher_replicas=1, teacher_cpus=1.0,
                 teacher_max_wait_ms=20.0)
    pool = TeacherPool.start(spec, _teacher_file(tmp_path, model), (1, 8, 8), 10)
    try:
        reference = TeacherServer(model, "fp32")
        rng = np.random.default_rng(2)
        per_student = [[rng.standard_normal((16, 1, 8, 8)).astype(np.float32) for _ in range(30)]
                       for _ in range(3)]
        results: dict[int, list] = {}

        def student(k: int) -> None:  # each student is its own client, as in a worker
            results[k] = list(pool.client().stream(iter(per_student[k])))

        threads = [threading.Thread(target=student, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        for k in range(3):
            assert len(results[k]) == 30
            for x, logits in zip(per_student[k], results[k]):
                assert np.allclose(logits, reference.logits(x), atol=1e-5)
        (stats,) = pool.stats()
        assert stats["requests"] == 90
        assert stats["forwards"] < 90  # requests from different students were batched together
    finally:
        pool.shutdown()
