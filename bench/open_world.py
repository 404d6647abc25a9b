"""Your own data, streamed: the same job from an in-memory source and from parquet, and a source
larger than the object store.

Not a test. In one run, on full MNIST (`--data-dir` holding `mnist/`):

  1  the same distillation job (LeNet-300-100 from a 1200-1200 MLP teacher trained once, logits
     cached so that both read the same teacher answers; one worker with both cores, bf16_autocast)
     from the in-memory `mnist` source and from MNIST written as parquet by pyarrow (PNG bytes
     and labels, as image datasets on the Hub are stored): samples/s of the dense phase, test
     accuracy, and the one-off preparation of the parquet copy;
  2  a streamed source 4x larger than the Ray object store (`object_store_memory` at Ray's 75 MiB
     floor; the rows are MNIST's training images repeated with a different pixel shift per copy,
     as uint8 arrays in parquet): one distillation epoch over it, with the peak resident memory
     of every process of the job sampled every 0.2 s, against the bound stated below.

    .venv/bin/python bench/open_world.py --data-dir ../shared/data --json bench/results/ow.json

JSON keys: inmemory_sps, streamed_sps (means over --repeats alternating pairs), ratio (the mean
of the pairs' streamed / in-memory, goal >= 0.8) and ratio_sd,
inmemory_accuracy, streamed_accuracy (goal: within 0.2 pt), streamed_job_wall_s (the first
streamed job, the parquet copy's preparation included), large_rows,
large_bytes, object_store_bytes, large_peak_rss_mb (the largest process), rss_bound_mb,
large_sps, and the settings.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from memory import PeakMemory  # noqa: E402

STORE_BYTES = 75 * 1024 * 1024  # Ray's smallest object store
RSS_BOUND_MB = 2048  # stated bound for any one process while streaming the large source


def write_mnist_parquet(data_dir: str, out: Path) -> Path:
    """MNIST's train and test sets as parquet files of PNG bytes and labels (pyarrow, Pillow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from specs.job import MnistData
    from trainers.data import load_mnist

    raw = load_mnist(MnistData(kind="mnist", normalize="none"), data_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", raw.x_train, raw.y_train), ("test", raw.x_test, raw.y_test)):
        pixels = np.round(x[:, 0] * 255).astype(np.uint8)  # back to the files' bytes
        for k, part in enumerate(np.array_split(np.arange(len(y)), 6 if split == "train" else 1)):
            images = []
            for i in part:
                buffer = io.BytesIO()
                Image.fromarray(pixels[i]).save(buffer, format="PNG")
                images.append(buffer.getvalue())
            pq.write_table(pa.table({"image": images, "label": y[part].tolist()}),
                           out / f"{split}-{k:05d}.parquet")
    return out


def write_large_parquet(data_dir: str, out: Path, copies: int) -> tuple[Path, int, int]:
    """`copies` shifted copies of MNIST's training images as uint8 arrays in parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from specs.job import MnistData
    from trainers.data import load_mnist

    raw = load_mnist(MnistData(kind="mnist", normalize="none"), data_dir)
    pixels = np.round(raw.x_train[:, 0] * 255).astype(np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    rows = nbytes = 0
    for c in range(copies):
        shifted = np.roll(pixels, shift=(c % 5 - 2, c // 5 % 5 - 2), axis=(1, 2))
        # one flat list of 784 pixels per row, 28x28 once read back (a square image)
        flat = shifted.reshape(len(shifted), -1)
        images = pa.ListArray.from_arrays(np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32),
                                          pa.array(flat.reshape(-1)))
        pq.write_table(pa.table({"image": images, "label": raw.y_train}),
                       out / f"train-{c:05d}.parquet", row_group_size=8192)
        rows += len(shifted)
        nbytes += shifted.nbytes
    test = np.round(raw.x_test[:, 0] * 255).astype(np.uint8)
    flat = test.reshape(len(test), -1)
    pq.write_table(pa.table({"image": pa.ListArray.from_arrays(
        np.arange(0, flat.size + 1, flat.shape[1], dtype=np.int32), pa.array(flat.reshape(-1))),
        "label": raw.y_test}), out / "test-00000.parquet")
    return out, rows, nbytes


def job_spec(name: str, data: dict, teacher: dict, epochs: int, work: Path) -> dict:
    return {
        "name": name, "seed": 0, "data": data, "teacher": teacher,
        "student": {"model": {"kind": "mlp", "hidden": [300, 100]}, "epochs": epochs,
                    "lr": 0.002, "batch_size": 256},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"enabled": False},
        "logits": {"mode": "cached", "cache_dir": str(work / "logits")},
        "precision": "bf16_autocast", "deepspeed": {"zero_stage": 0},
        "resources": {"teacher_replicas": 2, "teacher_cpus": 1.0, "student_workers": 1,
                      "student_cpus": 2.0},
        "wandb": {"mode": "disabled"},
    }


def dense_phase(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / "student-00-dense" / "COMPLETE.json")
                      .read_text())["meta"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3,
                        help="in-memory and streamed jobs run alternately this many times")
    parser.add_argument("--copies", type=int, default=7, help="MNIST copies in the large source")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--work-dir", type=Path)
    args = parser.parse_args()

    from safetensors.torch import save_file

    from orchestrator.job import run_job
    from specs import parse_spec
    from trainers.models import MLP

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="open-world-"))
    work.mkdir(parents=True, exist_ok=True)
    data_dir = str(Path(args.data_dir).resolve())
    started = time.perf_counter()

    # a teacher trained once, in plain torch (it is not what is measured), saved as safetensors
    import torch

    from specs.job import MnistData
    from trainers.data import load_mnist

    mnist = load_mnist(MnistData(kind="mnist"), data_dir)
    torch.manual_seed(0)
    teacher = MLP(784, [1200, 1200], 10)
    opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)
    x, y = torch.from_numpy(mnist.x_train), torch.from_numpy(mnist.y_train)
    for _ in range(2):
        for i in torch.randperm(len(x)).split(256):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(teacher(x[i]), y[i]).backward()
            opt.step()
    teacher_file = work / "teacher.safetensors"
    save_file(teacher.state_dict(), str(teacher_file))
    teacher_spec = {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [1200, 1200]},
                    "path": str(teacher_file)}

    # 1. in memory against streamed, the same job, alternately `--repeats` times (this VM's
    # speed drifts by tens of percent between minutes: one pair alone can mislead)
    inmemory = parse_spec(job_spec("ow-inmemory", {"kind": "mnist"}, teacher_spec, args.epochs,
                                   work))
    pq_dir = write_mnist_parquet(data_dir, work / "mnist-parquet")
    streamed_data = {"kind": "parquet", "train": str(pq_dir / "train-*.parquet"),
                     "test": str(pq_dir / "test-*.parquet"),
                     "normalize": {"mean": [0.1307], "std": [0.3081]},
                     "cache_dir": str(work / "prepared")}
    streamed = parse_spec(job_spec("ow-streamed", streamed_data, teacher_spec, args.epochs, work))
    pairs, first_streamed_wall = [], None
    for r in range(args.repeats):
        run_job(inmemory, data_dir=data_dir, run_dir=str(work / f"inmemory-{r}"))
        t0 = time.perf_counter()
        run_job(streamed, data_dir=data_dir, run_dir=str(work / f"streamed-{r}"))
        if first_streamed_wall is None:  # the parquet copy's preparation included
            first_streamed_wall = time.perf_counter() - t0
        pairs.append((dense_phase(work / f"inmemory-{r}"), dense_phase(work / f"streamed-{r}")))
    a, b = pairs[0]  # accuracies: the same in every repeat (deterministic jobs)
    ratios = [s["samples_per_s"] / m["samples_per_s"] for m, s in pairs]

    # 2. a streamed source 4x the object store, in a cluster with the smallest store
    import ray

    large_dir, large_rows, large_bytes = write_large_parquet(data_dir, work / "large", args.copies)
    large = parse_spec({**job_spec("ow-large", {
        "kind": "parquet", "train": str(large_dir / "train-*.parquet"),
        "test": str(large_dir / "test-*.parquet"), "normalize": {"mean": [0.1307], "std": [0.3081]},
        "cache_dir": str(work / "prepared")}, teacher_spec, 1, work)})
    ray.init(address="local", num_cpus=psutil.cpu_count(), object_store_memory=STORE_BYTES,
             include_dashboard=True, dashboard_host="127.0.0.1", logging_level="warning")
    try:
        with PeakMemory() as peak:
            run_job(large, data_dir=data_dir, run_dir=str(work / "large-run"), address="current")
    finally:
        ray.shutdown()
    c = dense_phase(work / "large-run")

    out = {
        "inmemory_sps": statistics.mean(m["samples_per_s"] for m, _ in pairs),
        "streamed_sps": statistics.mean(s["samples_per_s"] for _, s in pairs),
        "ratio": statistics.mean(ratios),
        "ratio_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0,
        "ratios": ratios,
        "inmemory_sps_each": [m["samples_per_s"] for m, _ in pairs],
        "streamed_sps_each": [s["samples_per_s"] for _, s in pairs],
        "accuracies_each": [[m["accuracy"], s["accuracy"]] for m, s in pairs],
        "inmemory_accuracy": a["accuracy"], "streamed_accuracy": b["accuracy"],
        "accuracy_gap_pt": 100 * abs(a["accuracy"] - b["accuracy"]),
        "streamed_job_wall_s": first_streamed_wall,
        "large_rows": large_rows, "large_bytes": large_bytes, "object_store_bytes": STORE_BYTES,
        "large_over_store": large_bytes / STORE_BYTES,
        "large_peak_rss_mb": peak.peak_one / 2**20, "large_peak_process": peak.who,
        "rss_bound_mb": RSS_BOUND_MB, "rss_within_bound": peak.peak_one / 2**20 < RSS_BOUND_MB,
        "large_sps": c["samples_per_s"], "large_accuracy": c["accuracy"],
        "epochs": args.epochs, "wall_seconds": time.perf_counter() - started,
        "cpus": psutil.cpu_count(), "work_dir": str(work),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
