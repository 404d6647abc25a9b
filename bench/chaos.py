"""Chaos benchmark: inject faults again and again into real runs on MNIST and count what survives.

Not a test and not run in CI (it takes about ten minutes on two CPU cores). Three faults, each
repeated `--repeats` times:

* F1 a teacher replica SIGKILLed in the middle of an epoch of requests: a two-replica pool streams
  every training batch (the 28x28 MNIST images through an MLP 256-256 teacher) while one replica
  is killed at a random point; every batch's logits must arrive exactly once and equal the
  unfaulted teacher's (a ledger of batch ids, compared bit for bit);
* F3 a student worker SIGKILLed in the middle of a pruning round of a real job: Ray Train restarts
  the worker group, which resumes after the last committed round;
* F6 the job's driver SIGKILLed (as `kill -9 PID` would) somewhere in round 2, and the same
  command run again: it resumes after the last committed round. Before the rerun it counts the
  processes of the killed job still alive 60 s later (Ray's, wandb's: there must be none).

For the jobs it reports checkpoints committed, partial checkpoints left on disk and loaded (a
partial one must never be loaded: the job only reads folders sealed by COMPLETE.json), the
recovery time (F3: from the kill to the restarted group's "[resume]" line; F6: from the rerun's
start to its first training epoch), the final accuracy against an unfaulted run of the same
spec, and W&B: the jobs log offline, and across a job's runs (the faulted one and its resume) every
planned step (each 10th, and each phase's end) must be in the `.wandb` files exactly once.

    .venv/bin/python bench/chaos.py --json bench/results/chaos.json

With `--json FILE` it writes {"f1": {...}, "f3": {...}, "f6": {...}, "unfaulted_accuracy": ...,
"config": {...}}; each fault entry has `injected`, `survived` and its own counts (see
`summary_table`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

STILLHOUSE = [sys.executable, "-m", "orchestrator.cli"]
LOG_EVERY = 10


def job_spec(args: argparse.Namespace, name: str) -> dict:
    return {
        "name": name, "seed": 0,
        "data": {"kind": "mnist", "train_limit": args.train_limit},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [256, 256]}, "epochs": 2,
                    "lr": 0.002, "batch_size": 128},
        "student": {"model": {"kind": "mlp", "hidden": [128, 64]}, "epochs": 3, "lr": 0.003,
                    "batch_size": 128},
        "distillation": {"kind": "hinton", "temperature": 4.0, "alpha": 0.7},
        "pruning": {"target_sparsity": 0.8, "rounds": 3, "finetune_epochs": 2},
        "precision": "bf16", "deepspeed": {"zero_stage": 1},
        "resources": {"teacher_replicas": 1, "teacher_cpus": 0.5, "student_workers": 2,
                      "student_cpus": 0.5, "worker_max_failures": 2},
        "wandb": {"mode": "offline", "log_every_steps": LOG_EVERY},
    }


# ------------------------------------------------------------------------------------ helpers


def _tree(pid: int):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _matching(pid: int, text: str):
    out = []
    for p in _tree(pid):
        try:
            if text in " ".join(p.cmdline()):
                out.append(p)
        except Exception:  # gone meanwhile
            pass
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    import psutil

    tree = _tree(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=30)


def _start(spec_path: Path, run_dir: Path, log: Path, data_dir: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    with open(log, "a") as out:
        return subprocess.Popen(
            STILLHOUSE + ["run", str(spec_path), "--run-dir", str(run_dir), "--data-dir", data_dir],
            cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"the job exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _checkpoint_counts(run_dir: Path) -> tuple[int, int]:
    root = run_dir / "checkpoints"
    complete = len(list(root.glob("*/COMPLETE.json")))
    partial = len([p for p in root.glob(".partial-*")]) if root.exists() else 0
    return complete, partial


def _loaded_partial(run_dir: Path, log_text: str) -> int:
    """How many checkpoints a resume loaded that are not complete (sealed and verified)."""
    from trainers import checkpoint

    bad = 0
    for name in re.findall(r"\[resume\] continuing after checkpoint (\S+)", log_text):
        try:
            checkpoint.verify(run_dir / "checkpoints" / name)
        except Exception:
            bad += 1
    return bad


def _count_checkpoints(out: dict, run_dir: Path, log: Path) -> None:
    complete, partial = _checkpoint_counts(run_dir)
    out["checkpoints_committed"] += complete
    out["partial_left"] += partial
    out["partial_loaded"] += _loaded_partial(run_dir, log.read_text())


def _count_wandb_steps(out: dict, run_dir: Path) -> None:
    """Planned student steps logged more than once, or never, across all of a job's W&B runs."""
    sys.path.insert(0, str(PROJECT_ROOT / "tests"))  # the reader of W&B's run files
    from wandb_file import job_history

    metas = [json.loads(p.read_text())["meta"]
             for p in sorted((run_dir / "checkpoints").glob("student-*/COMPLETE.json"))]
    steps = [r["_step"] for r in job_history(run_dir, "student-workers") if "_step" in r]
    planned = set(range(LOG_EVERY, metas[-1]["global_step"] + 1, LOG_EVERY)) | {
        m["global_step"] for m in metas}
    out["wandb_planned"] += len(planned)
    out["wandb_duplicated"] += len(steps) - len(set(steps))
    out["wandb_missing"] += len(planned - set(steps))


def _session_left(sid: int, wait_s: float) -> int:
    """Processes of session `sid` still alive after up to `wait_s` seconds."""
    import psutil

    def alive() -> int:
        n = 0
        for p in psutil.process_iter():
            try:
                n += os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE
            except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
                pass
        return n

    deadline = time.monotonic() + wait_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive()


def _final_accuracy(run_dir: Path) -> float:
    return json.loads((run_dir / "report.json").read_text())["final"]["accuracy"]


# ---------------------------------------------------------------------------------------- F1


def fault_f1(args: argparse.Namespace, rng: random.Random) -> dict:
    """Replica kills during a stream of every training batch; a ledger of batch ids."""
    import numpy as np
    import ray
    import torch
    from safetensors.torch import save

    from specs import parse_spec
    from trainers.data import load_dataset
    from trainers.models import build_model
    from trainers.teacher_pool import TeacherPool
    from trainers.teacher_server import TeacherServer

    # fp32, one thread and one request per forward (teacher_max_batch = the request size), as
    # in the in-process reference below, so that the logits must agree bit for bit
    spec = parse_spec({**job_spec(args, "chaos-f1"), "precision": "fp32", "resources": {
        "teacher_replicas": 2, "teacher_cpus": 0.5, "teacher_max_restarts": 100,
        "teacher_max_batch": 128, "student_workers": 1, "student_cpus": 0.5}})
    data = load_dataset(spec.data, args.data_dir, 0)
    torch.manual_seed(0)
    teacher = build_model(spec.teacher.model, data.image_shape, data.num_classes)
    teacher_file = Path(tempfile.mkdtemp(prefix="chaos-f1-")) / "teacher.safetensors"
    teacher_file.write_bytes(save(teacher.state_dict()))
    torch.set_num_threads(1)  # a replica with 0.5 CPU runs one thread
    reference = TeacherServer(teacher, "fp32")
    batch = 128
    starts = list(range(0, len(data.x_train) - batch + 1, batch))
    expected = {i: reference.logits(data.x_train[s : s + batch]) for i, s in enumerate(starts)}
    out = {"injected": 0, "survived": 0, "batches_planned": 0, "batches_unique": 0,
           "batches_duplicated": 0, "batches_lost": 0, "batches_wrong": 0, "recovery_s": []}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        pool = TeacherPool.start(spec, teacher_file, data.image_shape, data.num_classes)
        for _ in range(args.repeats):
            kill_at = rng.randrange(5, len(starts) - 5)
            ledger: dict[int, int] = {}
            gaps = []
            client = pool.client()
            out["injected"] += 1
            last = time.perf_counter()
            try:
                for i, logits in enumerate(client.stream(data.x_train[s : s + batch] for s in starts)):
                    now = time.perf_counter()
                    gaps.append(now - last)
                    last = now
                    ledger[i] = ledger.get(i, 0) + 1
                    if not np.array_equal(logits, expected[i]):
                        out["batches_wrong"] += 1
                    if i == kill_at:  # SIGKILL the replica process, mid-stream
                        pid = ray.get(pool.replicas[rng.randrange(2)].stats.remote())["pid"]
                        os.kill(pid, signal.SIGKILL)
            except Exception as err:  # the pool gave up: not survived
                print(f"[chaos] F1 stream failed: {err}", flush=True)
                continue
            out["batches_planned"] += len(starts)
            out["batches_unique"] += len(ledger)
            out["batches_duplicated"] += sum(c - 1 for c in ledger.values())
            out["batches_lost"] += len(starts) - len(ledger)
            out["recovery_s"].append(max(gaps[kill_at:]))  # the longest wait after the kill
            if len(ledger) == len(starts) and all(c == 1 for c in ledger.values()):
                out["survived"] += 1
            time.sleep(2)  # let Ray restart the replica before the next round
        pool.shutdown()
    finally:
        ray.shutdown()
    return out


# ----------------------------------------------------------------------------------- F3, F6


def _job_tally() -> dict:
    """The counts F3 and F6 report, before any fault."""
    return {"injected": 0, "survived": 0, "checkpoints_committed": 0, "partial_left": 0,
            "partial_loaded": 0, "recovery_s": [], "accuracy_gap": [], "wandb_planned": 0,
            "wandb_duplicated": 0, "wandb_missing": 0}


def _tally_run(out: dict, run_dir: Path, log: Path, survived: bool, reference: float) -> None:
    """Add one faulted job's checkpoints and, if it survived, its accuracy gap and W&B steps."""
    _count_checkpoints(out, run_dir, log)
    if survived:
        out["survived"] += 1
        out["accuracy_gap"].append(_final_accuracy(run_dir) - reference)
        _count_wandb_steps(out, run_dir)


def fault_f3(args, work: Path, spec_path: Path, reference: float) -> dict:
    out = _job_tally()
    for r in range(args.repeats):
        run_dir, log = work / f"f3-{r}", work / f"f3-{r}.log"
        proc = _start(spec_path, run_dir, log, args.data_dir)
        marker = run_dir / "checkpoints" / "student-01-round1" / "COMPLETE.json"
        try:
            _wait_for(marker.exists, proc, 900, "round 1")
            victims = _matching(proc.pid, "RayTrainWorker")
            while not victims:
                time.sleep(0.05)
                victims = _matching(proc.pid, "RayTrainWorker")
            victims[-1].send_signal(signal.SIGKILL)
            killed = time.monotonic()
            out["injected"] += 1
            _wait_for(lambda: "[resume] continuing after" in log.read_text(), proc, 600, "resume")
            out["recovery_s"].append(time.monotonic() - killed)
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                _kill_tree(proc)
        _tally_run(out, run_dir, log, rc == 0, reference)
    return out


def fault_f6(args, work: Path, spec_path: Path, reference: float) -> dict:
    out = {**_job_tally(), "processes_left": 0}
    for r in range(args.repeats):
        run_dir, log = work / f"f6-{r}", work / f"f6-{r}.log"
        proc = _start(spec_path, run_dir, log, args.data_dir)
        marker = run_dir / "checkpoints" / "student-01-round1" / "COMPLETE.json"
        try:
            _wait_for(marker.exists, proc, 900, "round 1")
            time.sleep(random.uniform(0.0, 3.0))  # somewhere in round 2
        finally:
            proc.send_signal(signal.SIGKILL)  # the driver alone
            proc.wait(timeout=60)
        out["injected"] += 1
        out["processes_left"] += _session_left(proc.pid, 60)
        _kill_tree(proc)  # whatever is left, so that the rerun starts clean
        before = len(log.read_text())
        rerun = _start(spec_path, run_dir, log, args.data_dir)
        started = time.monotonic()
        try:
            _wait_for(lambda: "epoch 1/" in log.read_text()[before:], rerun, 600, "a new epoch")
            out["recovery_s"].append(time.monotonic() - started)
            rc = rerun.wait(timeout=900)
        finally:
            if rerun.poll() is None:
                _kill_tree(rerun)
        _tally_run(out, run_dir, log, rc == 0 and "resuming after student-0" in
                   log.read_text()[before:], reference)
    return out


# -------------------------------------------------------------------------------------- main


def summary_table(result: dict) -> str:
    rows = [("fault", "injected", "survived", "batches planned/unique/dup/lost",
             "ckpts committed / partial left / partial loaded", "recovery s (median, max)",
             "accuracy gap (max |.|)", "W&B steps planned/dup/missing", "procs left")]
    for key, label in (("f1", "F1 replica killed"), ("f3", "F3 worker killed"),
                       ("f6", "F6 driver killed, rerun")):
        r = result[key]
        rec = r["recovery_s"]
        batches = "-"
        if "batches_planned" in r:
            batches = (f"{r['batches_planned']}/{r['batches_unique']}/"
                       f"{r['batches_duplicated']}/{r['batches_lost']}"
                       + (f" ({r['batches_wrong']} wrong)" if r["batches_wrong"] else ""))
        ckpts = "-" if "checkpoints_committed" not in r else (
            f"{r['checkpoints_committed']} / {r['partial_left']} / {r['partial_loaded']}")
        gap = "-" if not r.get("accuracy_gap") else f"{max(abs(g) for g in r['accuracy_gap']):.4f}"
        steps = "-" if "wandb_planned" not in r else (
            f"{r['wandb_planned']}/{r['wandb_duplicated']}/{r['wandb_missing']}")
        rows.append((label, str(r["injected"]), str(r["survived"]), batches, ckpts,
                     f"{statistics.median(rec):.1f}, {max(rec):.1f}" if rec else "-", gap, steps,
                     str(r.get("processes_left", "-"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"unfaulted run's final accuracy: {result['unfaulted_accuracy']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Inject F1, F3 and F6 faults repeatedly on MNIST.")
    p.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-limit", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    import yaml

    work = Path(tempfile.mkdtemp(prefix="stillhouse-chaos-"))
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(job_spec(args, "chaos")))
    print(f"[chaos] work dir {work}", flush=True)

    print("[chaos] F1: replica kills during full passes over the training set", flush=True)
    f1 = fault_f1(args, rng)
    print("[chaos] the unfaulted run", flush=True)
    ref_dir = work / "unfaulted"
    proc = _start(spec_path, ref_dir, work / "unfaulted.log", args.data_dir)
    if proc.wait(timeout=1800) != 0:
        print((work / "unfaulted.log").read_text()[-3000:])
        return 1
    reference = _final_accuracy(ref_dir)
    print("[chaos] F3: a student worker killed in round 2", flush=True)
    f3 = fault_f3(args, work, spec_path, reference)
    print("[chaos] F6: the driver killed in round 2, then the job run again", flush=True)
    f6 = fault_f6(args, work, spec_path, reference)
    result = {"f1": f1, "f3": f3, "f6": f6, "unfaulted_accuracy": reference,
              "config": {"repeats": args.repeats, "train_limit": args.train_limit,
                         "seed": args.seed, "work_dir": str(work)}}
    print("\n" + summary_table(result), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
