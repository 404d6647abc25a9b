"""GPU check: the `gpu` tests, then stillhouse against the best hand-written KD loop on one GPU.

Not a test; one prepared run for a machine with a CUDA GPU:

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --data-dir DATA --json $OUT/gpu_check.json

`DATA` holds `mnist/` with its four IDX files (nothing is downloaded). In order:

1. preflight: the Python packages the run needs (the JSON lists any missing, and the run stops);
2. `pytest -m gpu tests/test_gpu.py`: engine, masks, fp16 loss scaling, teacher and a whole
   digits job on the GPU (their summary goes into the JSON as `gpu_tests`);
3. throughput on MNIST resized to 32x32 RGB, a ResNet-18 teacher (timm, trained here for
   `--teacher-epochs`) and a ResNet-10-T student (timm, 4.9 M parameters against 11.2 M), the same
   global batch everywhere:

   plain        the hand-written single-process loop on the GPU, all data on the device,
                teacher forward inline; fp32 and bf16 autocast, each with and without
                channels-last; the fastest is `plain_sps`
   plain_cached the same loop reading precomputed teacher logits (`plain_cached_sps`)
   online       stillhouse, `logits.mode: online`: one worker on the GPU and two teacher
                replicas; on a one-GPU machine they share it (worker 0.5, replicas 0.25 each),
                with two GPUs or more the worker has one to itself (`online_sps`)
   cached       stillhouse, `logits.mode: cached`: the replicas (half a GPU each) fill the logit
                cache, then the worker gets the whole GPU (`cached_sps`)
   pool         the teacher pool's logits/s over the training set, replicas on GPU shares, inputs
                already in the object store (`pool_lps`)
   inprocess    the same teacher's batched forward in this process on the GPU (`inprocess_lps`)

The stillhouse runs use the spec keys `model: {kind: timm, name: ..., kwargs: {}}` and the
data keys `image_size: [32, 32]`, `channels: 3`; the hand-written loop builds the same models
through `trainers.models.build_model` and the same preprocessing (bilinear resize, the gray
channel repeated) where the loaded arrays are not already 3x32x32.

JSON keys: plain_sps, online_sps, cached_sps, pool_lps, inprocess_lps, gpu_name, plus
plain_cached_sps, ratios, accuracies, gpu_tests, environment and the settings used.

    python bench/gpu_check.py --allow-cpu --skip-tests --samples 2000 --epochs 1 \\
        --teacher-model '{"kind": "mlp", "hidden": [256]}' \\
        --student-model '{"kind": "mlp", "hidden": [64]}' --data '{"kind": "mnist"}'

runs the same steps on the CPU with small models, to check the script itself without a GPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NEEDED = ["torch", "numpy", "yaml", "pydantic", "safetensors", "sklearn", "psutil", "pytest",
          "timm", "ray", "ray.train", "ray.data", "deepspeed"]
TEACHER = {"kind": "timm", "name": "resnet18", "kwargs": {}}
STUDENT = {"kind": "timm", "name": "resnet10t", "kwargs": {}}
DATA = {"kind": "mnist", "image_size": [32, 32], "channels": 3}


def preflight() -> tuple[list[str], dict]:
    missing, versions = [], {}
    for name in NEEDED:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "")
        except Exception as err:  # ImportError, or a package broken against this torch
            missing.append(f"{name} ({type(err).__name__}: {err})")
    return missing, versions


def run_gpu_tests(junit: Path) -> dict:
    """The gpu-marked tests, in a child process; counts from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-rs", "-q", "-p", "no:cacheprovider",
         "tests/test_gpu.py", f"--junitxml={junit}"],
        cwd=ROOT, capture_output=True, text=True)
    out = {"returncode": result.returncode, "seconds": time.perf_counter() - started,
           "tail": (result.stdout + result.stderr)[-4000:]}
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        out.update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
        out["failed"] = [case.get("name") for case in suite.iter("testcase")
                         if case.find("failure") is not None or case.find("error") is not None]
    print(out["tail"], flush=True)
    return out


# ------------------------------------------------------------------------------ throughput


def load_images(data_spec, data_dir: str, rgb32: bool):
    """(x_train, y_train, x_test, y_test) as torch tensors, with `rgb32` 3x32x32 (resized here
    if the loader did not already), and the image shape."""
    import torch
    import torch.nn.functional as F

    from trainers.data import load_dataset

    ds = load_dataset(data_spec, data_dir, 0)
    tensors = []
    for x in (ds.x_train, ds.x_test):
        x = torch.from_numpy(x)
        if rgb32 and x.shape[1:] != (3, 32, 32):
            # the spec's preprocessing, for a loader that leaves it to later: bilinear resize
            # to 32x32 and the gray channel repeated, (N, 1, 28, 28) -> (N, 3, 32, 32)
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            x = x.expand(-1, 3, -1, -1).contiguous()
        tensors.append(x)
    y_train, y_test = torch.from_numpy(ds.y_train), torch.from_numpy(ds.y_test)
    return tensors[0], y_train, tensors[1], y_test, tuple(tensors[0].shape[1:])


def build(model_spec, image_shape, device, channels_last=False):
    from trainers.models import build_model

    model = build_model(model_spec, image_shape, 10).to(device)
    if channels_last:
        model = model.to(memory_format=__import__("torch").channels_last)
    return model


def train_teacher(spec, x, y, image_shape, device, epochs: int, batch: int):
    """A quickly trained teacher (bf16 autocast on the GPU), so the KD signal is real."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    teacher = build(spec.teacher.model, image_shape, device)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-3)
    for _ in range(epochs):
        for i in torch.randperm(len(x), device=device).split(batch):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(teacher(x[i]).float(), y[i])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return teacher.eval().requires_grad_(False)


def plain_loop(spec, teacher, x, y, x_test, y_test, image_shape, device, *, epochs, batch,
               bf16, channels_last, cached_logits=None) -> tuple[float, float]:
    """The loop a user writes by hand on one GPU; returns (samples/s, test accuracy). A few
    untimed warm-up steps first (cuDNN picks its kernels), which stillhouse's figure includes."""
    import torch

    from trainers.kd_loss import kd_loss

    torch.manual_seed(0)
    student = build(spec.student.model, image_shape, device, channels_last)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(student.parameters(), lr=spec.student.lr, **fused)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            if cached_logits is None:
                with torch.no_grad():
                    t = teacher(x[i]).float()
            else:
                t = cached_logits[i]
            s = student(x[i])
        loss, _ = kd_loss(s, t, y[i], spec.distillation.temperature, spec.distillation.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in torch.randperm(len(x), device=device)[: 10 * batch].split(batch):
        step(i)
    _sync(device)
    steps, start = 0, time.perf_counter()
    for epoch in range(epochs):
        g = torch.Generator(device=device).manual_seed(epoch)
        for i in torch.randperm(len(x), device=device, generator=g).split(batch):
            if len(i) == batch:
                step(i)
                steps += 1
    _sync(device)
    sps = steps * batch / (time.perf_counter() - start)
    student.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = torch.cat([student(x_test[i : i + 4096]).argmax(-1)
                          for i in range(0, len(x_test), 4096)])
    return sps, float((pred == y_test).float().mean())


def inprocess_forward(teacher, x_train_np, precision: str, device) -> float:
    """The teacher server's batched forward in this process: numpy in, numpy out, like a
    replica's."""
    from trainers.teacher_server import TeacherServer

    server = TeacherServer(teacher, precision, device=device)
    server.logits(x_train_np[:1024])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(x_train_np), 1024):
        server.logits(x_train_np[i : i + 1024])
    return len(x_train_np) / (time.perf_counter() - start)


def job_spec(args, layout: dict, mode: str, teacher_file: Path, work: Path, name: str):
    from specs import parse_spec

    return parse_spec({
        "name": name,
        "data": {**args.data, "train_limit": args.samples} if args.data["kind"] == "mnist"
        else args.data,
        "teacher": {"kind": "checkpoint", "model": args.teacher_model, "path": str(teacher_file)},
        "student": {"model": args.student_model, "epochs": args.epochs, "lr": args.lr,
                    "batch_size": args.batch, "grad_clip": 0.0},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"enabled": False},
        "logits": {"mode": mode, "cache_dir": str(work / "cache")},
        "precision": args.precision,
        "deepspeed": {"zero_stage": 0},
        "resources": {**layout, "student_workers": 1, "prefetch_batches": args.prefetch},
        "wandb": {"mode": "disabled"},
    })


def layouts(args, gpus: int) -> dict[str, dict]:
    """Resources per stillhouse run: GPU shares that fit this machine, CPUs beside them."""
    cpus = os.cpu_count() or 2
    if gpus == 0:  # --allow-cpu: the check of the script itself
        return {"online": {"teacher_replicas": 2, "teacher_cpus": 0.5, "student_cpus": 1.0},
                "cached": {"teacher_replicas": 2, "teacher_cpus": 0.5, "student_cpus": 1.0},
                "pool": {"teacher_replicas": 2, "teacher_cpus": 1.0}}
    worker = 1.0 if gpus >= 2 else 0.5  # one GPU: the worker shares it with the replicas
    share = 0.5 if gpus >= 2 else 0.25
    student_cpus = max(1.0, cpus / 2)
    teacher_cpus = max(1.0, (cpus - student_cpus) / 2)
    return {
        "online": {"teacher_replicas": 2, "teacher_gpus": share, "teacher_cpus": teacher_cpus,
                   "student_gpus": worker, "student_cpus": student_cpus},
        # the replicas fill the cache and leave before the worker starts: all of it to each
        "cached": {"teacher_replicas": 2, "teacher_gpus": 0.5, "teacher_cpus": cpus / 2,
                   "student_gpus": 1, "student_cpus": float(cpus)},
        "pool": {"teacher_replicas": 2, "teacher_gpus": 0.5, "teacher_cpus": cpus / 2},
    }


def pipeline(args, spec, work: Path, mode: str) -> dict:
    """One stillhouse job, dense student only; returns the dense phase's checkpoint meta."""
    from orchestrator.job import run_job

    run_dir = work / mode
    report = run_job(spec, data_dir=args.data_dir, run_dir=str(run_dir))
    meta = json.loads((run_dir / "checkpoints" / "student-00-dense" / "COMPLETE.json")
                      .read_text())["meta"]
    meta["test_accuracy"] = report["final"]["accuracy"]
    return meta


def pool_throughput(spec, teacher_file: Path, x_train_np, image_shape) -> float:
    """The pool's logits/s over the training set, inputs already in the object store."""
    import ray

    from trainers.teacher_pool import TeacherPool

    ray.init(address="local", include_dashboard=False, logging_level="warning")
    try:
        pool = TeacherPool.start(spec, teacher_file.read_bytes(), image_shape, 10)
        pool.predict(x_train_np[:4096], batch_size=1024)  # warm-up
        source = ray.put(x_train_np)
        start = time.perf_counter()
        pool.predict(source, batch_size=1024)
        wall = time.perf_counter() - start
        pool.shutdown()
    finally:
        ray.shutdown()
    return len(x_train_np) / wall


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args, work: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device("cuda", 0) if gpus else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    lay = layouts(args, gpus)
    base = job_spec(args, lay["online"], "online", work / "teacher.safetensors", work, "base")
    rgb32 = args.data.get("channels") == 3 and args.data.get("image_size") == [32, 32]
    x, y, x_test, y_test, image_shape = load_images(base.data, args.data_dir, rgb32)
    x, y, x_test, y_test = (t.to(device) for t in (x, y, x_test, y_test))
    teacher = train_teacher(base, x, y, image_shape, device, args.teacher_epochs, args.batch)
    teacher_file = work / "teacher.safetensors"
    save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()},
              str(teacher_file))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                         enabled=args.precision != "fp32"):
        cached = torch.cat([teacher(x[i : i + 4096]).float() for i in range(0, len(x), 4096)])
    teacher_acc = float((torch.cat([teacher(x_test[i : i + 4096]).argmax(-1)
                                    for i in range(0, len(x_test), 4096)]) == y_test)
                        .float().mean())
    x_np = x.cpu().numpy()

    results: dict[str, tuple[float, float]] = {}
    for bf16 in (False, True):
        for channels_last in (False, True):
            tag = ("bf16" if bf16 else "fp32") + ("_cl" if channels_last else "")
            for name, logits in ((f"plain_{tag}", None), (f"plain_cached_{tag}", cached)):
                print(f"[gpu_check] {name}", flush=True)
                results[name] = plain_loop(
                    base, teacher, x, y, x_test, y_test, image_shape, device,
                    epochs=args.epochs, batch=args.batch, bf16=bf16,
                    channels_last=channels_last, cached_logits=logits)
    precision = "fp32" if args.precision == "fp32" else "bf16"
    print("[gpu_check] in-process teacher", flush=True)
    inproc = inprocess_forward(teacher, x_np, precision, device)
    del x, y, x_test, y_test, cached, teacher
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stillhouse processes get the GPU's memory

    print("[gpu_check] teacher pool", flush=True)
    pool = pool_throughput(job_spec(args, lay["pool"], "online", teacher_file, work, "pool"),
                           teacher_file, x_np, image_shape)
    runs = {}
    for mode in ("online", "cached"):
        print(f"[gpu_check] stillhouse {mode}", flush=True)
        spec = job_spec(args, lay[mode], mode, teacher_file, work, f"gpu-check-{mode}")
        runs[mode] = pipeline(args, spec, work, mode)

    plain = max((v for k, v in results.items() if not k.startswith("plain_cached")),
                key=lambda r: r[0])
    plain_cached = max((v for k, v in results.items() if k.startswith("plain_cached")),
                       key=lambda r: r[0])
    online, cached_run = runs["online"], runs["cached"]
    return {
        "gpu_name": torch.cuda.get_device_name(0) if gpus else None,
        "plain_sps": plain[0], "plain_cached_sps": plain_cached[0],
        "online_sps": online["samples_per_s"], "cached_sps": cached_run["samples_per_s"],
        "pool_lps": pool, "inprocess_lps": inproc,
        "ratios": {"online_over_plain": online["samples_per_s"] / plain[0],
                   "cached_over_plain_cached": cached_run["samples_per_s"] / plain_cached[0],
                   "pool_over_inprocess": pool / inproc},
        "accuracy": {"teacher": teacher_acc, "plain": plain[1], "plain_cached": plain_cached[1],
                     "online": online["test_accuracy"], "cached": cached_run["test_accuracy"]},
        "detail": {k: {"sps": v[0], "accuracy": v[1]} for k, v in results.items()},
        "layouts": lay, "samples": len(x_np), "image_shape": list(image_shape),
        "stillhouse_device": online.get("device"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--samples", type=int, default=60000)
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs")
    parser.add_argument("--batch", type=int, default=512, help="global batch size")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--teacher-epochs", type=int, default=1)
    parser.add_argument("--precision", choices=["fp32", "bf16", "bf16_autocast", "fp16"],
                        default="bf16_autocast", help="stillhouse's (the loop tries fp32, bf16)")
    parser.add_argument("--prefetch", type=int, default=4)
    parser.add_argument("--teacher-model", type=json.loads, default=TEACHER)
    parser.add_argument("--student-model", type=json.loads, default=STUDENT)
    parser.add_argument("--data", type=json.loads, default=DATA)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="run without a GPU (checks the script, measures nothing useful)")
    args = parser.parse_args()

    out: dict = {"settings": vars(args)}

    def write() -> None:
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2, default=str))

    missing, versions = preflight()
    out["environment"] = {"python": sys.version.split()[0], "versions": versions,
                          "missing": missing}
    if missing:
        print("[gpu_check] missing packages: " + "; ".join(missing), file=sys.stderr)
        write()
        return 3
    import torch

    out["environment"]["cuda"] = torch.version.cuda
    out["environment"]["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not out["environment"]["gpus"] and not args.allow_cpu:
        print("[gpu_check] torch sees no CUDA device (--allow-cpu to check the script)",
              file=sys.stderr)
        write()
        return 3
    with tempfile.TemporaryDirectory(prefix="stillhouse-gpu-check-") as tmp:
        work = Path(tmp)
        if not args.skip_tests:
            print("[gpu_check] pytest -m gpu", flush=True)
            out["gpu_tests"] = run_gpu_tests(work / "junit.xml")
            write()
        out.update(throughput(args, work))
    write()
    print(json.dumps({k: out[k] for k in ("gpu_name", "plain_sps", "plain_cached_sps",
                                          "online_sps", "cached_sps", "pool_lps",
                                          "inprocess_lps", "ratios")}, indent=2))
    failed = out.get("gpu_tests", {}).get("returncode", 0)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
