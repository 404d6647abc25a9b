"""Where the teacher pool's time goes, next to the same teacher's in-process forward.

Not a test. The throughput benchmark's teacher (MLP 784-1200-1200-10, bf16, batches of 1024) runs
over `--samples` random MNIST-shaped inputs: in this process with 1 and with 2 threads, then
through a pool of 2 replicas x 1 CPU on an embedded cluster, the inputs put into the object store
once beforehand (the put's time is printed too). For the pool it prints the CPU seconds each
replica and the calling process spent, against the wall time.

    .venv/bin/python bench/pool_profile.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specs import parse_spec  # noqa: E402
from trainers.models import MLP  # noqa: E402
from trainers.teacher_server import TeacherServer  # noqa: E402

BATCH = 1024


def cpu_seconds(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=60000)
    args = parser.parse_args()
    from safetensors.torch import save_file

    torch.manual_seed(0)
    teacher = MLP(784, [1200, 1200], 10).eval()
    x = np.random.default_rng(0).random((args.samples, 1, 28, 28), dtype=np.float32)
    teacher_file = Path(tempfile.mkdtemp(prefix="stillhouse-pool-")) / "teacher.safetensors"
    save_file(teacher.state_dict(), str(teacher_file))

    for threads in (1, 2):
        torch.set_num_threads(threads)
        server = TeacherServer(teacher, "bf16")
        server.logits(x[:BATCH])  # warm-up
        started = time.perf_counter()
        for i in range(0, len(x), BATCH):
            server.logits(x[i : i + BATCH])
        rate = len(x) / (time.perf_counter() - started)
        print(f"in-process, {threads} thread{'s' if threads > 1 else ''}: {rate:,.0f} logits/s")

    import ray

    from trainers.teacher_pool import TeacherPool

    spec = parse_spec({
        "name": "pool-profile", "data": {"kind": "mnist"},
        "teacher": {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [1200, 1200]},
                    "path": str(teacher_file)},
        "student": {"model": {"kind": "mlp", "hidden": [300, 100]}},
        "precision": "bf16",
        "resources": {"teacher_replicas": 2, "teacher_cpus": 1.0, "prefetch_batches": 4},
    })
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="error")
    try:
        pool = TeacherPool.start(spec, teacher_file, (1, 28, 28), 10)
        pool.predict(x[: 2 * BATCH], batch_size=BATCH)  # warm-up
        replicas = [psutil.Process(s["pid"]) for s in pool.stats()]
        me = psutil.Process()
        started = time.perf_counter()
        source = ray.put(x)  # once, as a student worker puts its training inputs
        put_s = time.perf_counter() - started
        before = [cpu_seconds(p) for p in replicas], cpu_seconds(me)
        started = time.perf_counter()
        pool.predict(source, batch_size=BATCH)
        wall = time.perf_counter() - started
        after = [cpu_seconds(p) for p in replicas], cpu_seconds(me)
        pool.shutdown()
    finally:
        ray.shutdown()
    busy = ", ".join(f"{b - a:.2f}" for a, b in zip(before[0], after[0]))
    print(f"pool, 2 replicas x 1 CPU: {len(x) / wall:,.0f} logits/s in {wall:.2f} s wall "
          f"({len(x) / (wall + put_s):,.0f} counting the {put_s:.2f} s put of the inputs); "
          f"replica CPU s {busy}; calling process CPU s {after[1] - before[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
