"""MNIST compression benchmark: distil LeNet-300-100 from a 1200-1200 MLP, then prune it.

Not a test and not run in CI: it trains on full MNIST and takes tens of minutes on two CPU cores.

What it measures (all on the 10,000-image MNIST test set):

* the teacher, an MLP with hidden layers 1200-1200, trained with cross-entropy;
* LeNet-300-100 (MLP 300-100) trained alone (pure cross-entropy) and distilled from the teacher,
  with the same epochs, learning rate, seed and data order;
* the distilled LeNet-300-100 pruned by iterative global magnitude pruning through an explicit
  schedule (by default 50, 75, 85, 90, 92 and 95 % sparsity), with distilled fine-tuning after
  every round; each round's test error and nonzero weights.

It checks the Han et al. (2015) result for LeNet-300-100: at least 92 % of the weights removed at
no more than +0.1 percentage point test error over the dense (distilled) student.

Then the model files: for LeNet-300-100 and for LeNet-5 (distilled from the same teacher, pruned
by its own schedule), every pruning round's weights are exported as sparse int8 files
(post-training dynamic int8, trainers/export.py), and the job's own last stage exports the final
round after `--qat-epochs` of quantization-aware distillation. The best pipeline is the smallest
file whose test error is at most +0.1 pt over the dense distilled student's; its size reduction
is compared with the dense fp32 student's file (Deep Compression, Han et al. 2016, reached 40x on
LeNet-300-100 and 39x on LeNet-5 with pruning, 5-8 bit weight sharing and Huffman coding).

Three stillhouse jobs, each on its own embedded local Ray cluster (`orchestrator.job.run_job`):

1. `distilled`: trains the teacher, distils the dense student, runs every pruning round, QAT;
2. `alone`: the student trained alone (`distillation.alpha: 0`, pruning disabled), with the
   teacher loaded from job 1's checkpoint so it is not trained again (the teacher pool still
   serves logits, which get zero weight);
3. `lenet5`: LeNet-5 distilled from job 1's teacher, pruned, QAT (`--skip-lenet5` leaves it out).

Run it from the project root:

    .venv/bin/python bench/mnist_compression.py --json bench/results/mnist.json

    # a quick smoke run (a few minutes): 5,000 training images, one epoch per stage
    .venv/bin/python bench/mnist_compression.py --train-limit 5000 --teacher-epochs 1 \\
        --student-epochs 1 --finetune-epochs 1 --json bench/results/smoke.json

Run dirs go under `<work-dir>/<run-name>/{distilled,alone}` (`--run-name` defaults to a time
stamp, so each invocation starts fresh). Giving the `--run-name` of an interrupted run with the
same options resumes it after its last finished stage; `wall_seconds` then only counts this
invocation.

With `--json FILE` it writes one JSON object:

    teacher_error            test error of the teacher, a fraction of the 10k test set
    student_alone_error      LeNet-300-100 trained alone (cross-entropy only)
    student_distilled_error  LeNet-300-100 distilled from the teacher (dense, before pruning)
    pruned                   one entry per pruning round, in order:
                               target_sparsity  the schedule's sparsity for the round
                               sparsity         share of zero weights among the prunable weights
                                                (all Linear weights; biases are not pruned)
                               error            test error after the round's fine-tuning
                               nonzero_params   nonzero parameters, biases included
    dense_params             parameters of the dense student, biases included (266,610)
    wall_seconds             wall time of this invocation, both jobs together

    compression              per model ("lenet300", "lenet5"):
                               dense_error       the dense distilled student's test error
                               dense_file_bytes  its fp32 safetensors file
                               candidates        one per exported file: stage ("round N int8"
                                                 or "final qat int8"), sparsity, error,
                                                 file_bytes, reduction (dense_file_bytes /
                                                 file_bytes), within_0_1pt (bool)
                               best              the candidate with the smallest file among those
                                                 within +0.1 pt, or null
                               deep_compression  the reduction Han et al. 2016 report (40 / 39)

and, for convenience, `teacher_params`, `han_target` (whether and by which round it was met),
`config` (the options used) and `run_dirs`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make `specs`, `orchestrator` importable
    sys.path.insert(0, str(PROJECT_ROOT))

from specs import parse_spec  # noqa: E402

TEACHER_HIDDEN = [1200, 1200]
STUDENT_HIDDEN = [300, 100]
HAN_SPARSITY = 0.92  # Han et al. (2015): LeNet-300-100 pruned 12x (92 % of the weights)
HAN_MAX_DELTA_PT = 0.1  # allowed error increase over the dense student, in percentage points
DEEP_COMPRESSION = {"lenet300": 40.0, "lenet5": 39.0}  # Han et al. 2016, file size reduction


# ------------------------------------------------------------------------------------ specs


def _common(args: argparse.Namespace, name: str) -> dict:
    data: dict = {"kind": "mnist"}
    if args.train_limit is not None:
        data["train_limit"] = args.train_limit
    return {
        "name": name,
        "seed": args.seed,
        "data": data,
        "student": {
            "model": {"kind": "mlp", "hidden": STUDENT_HIDDEN},
            "epochs": args.student_epochs,
            "lr": args.student_lr,
            "batch_size": args.batch_size,
        },
        "precision": "bf16",
        "deepspeed": {"zero_stage": args.zero_stage},
        "resources": {
            "teacher_replicas": 1,
            "teacher_cpus": 0.5,
            "student_workers": 2,
            "student_cpus": 0.75,
        },
        "wandb": {"mode": "disabled"},
    }


def _distil_prune_qat(args: argparse.Namespace, schedule: list[float]) -> dict:
    """The spec sections jobs 1 and 3 share: distillation, pruning by `schedule`, then QAT."""
    return {
        "distillation": {"kind": "hinton", "temperature": args.temperature, "alpha": args.alpha},
        "pruning": {
            "enabled": True,
            "target_sparsity": schedule[-1],
            "rounds": len(schedule),
            "finetune_epochs": args.finetune_epochs,
            "schedule": {"kind": "explicit", "sparsities": schedule},
        },
        "quantization": {"method": "qat", "finetune_epochs": args.qat_epochs},
    }


def distilled_spec(args: argparse.Namespace) -> dict:
    """Job 1: train the teacher, distil the dense student, prune it round by round."""
    raw = _common(args, "bench-mnist-distilled")
    raw["teacher"] = {
        "kind": "train",
        "model": {"kind": "mlp", "hidden": TEACHER_HIDDEN},
        "epochs": args.teacher_epochs,
        "lr": args.teacher_lr,
        "batch_size": args.batch_size,
    }
    return {**raw, **_distil_prune_qat(args, args.schedule)}


def _teacher_from(teacher_file: Path) -> dict:
    """Job 1's trained teacher, loaded from its file by jobs 2 and 3."""
    return {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": TEACHER_HIDDEN},
            "path": str(teacher_file)}


def lenet5_spec(args: argparse.Namespace, teacher_file: Path) -> dict:
    """Job 3: LeNet-5 distilled from job 1's teacher, pruned by its own schedule, then QAT."""
    raw = _common(args, "bench-mnist-lenet5")
    raw["teacher"] = _teacher_from(teacher_file)
    raw["student"] = {"model": {"kind": "lenet5"}, "epochs": args.lenet5_epochs,
                      "lr": args.student_lr, "batch_size": args.batch_size}
    return {**raw, **_distil_prune_qat(args, args.lenet5_schedule)}


def file_candidates(report: dict, run_dir: Path, data, key: str) -> dict:
    """Every pruning round exported as a sparse int8 file, plus the job's own QAT export."""
    import torch
    from safetensors.torch import load_file

    from specs import load_spec
    from trainers.export import accuracy, load_compressed, write_compressed
    from trainers.models import architecture, build_from_architecture
    from trainers.plan import student_phases
    from trainers.quantize import layer_kinds, quantize_state, weight_kinds

    spec = load_spec(run_dir / "spec.yaml")
    arch = architecture(spec.student.model, data.image_shape, data.num_classes)
    dense_err = error_of(report["dense_student"]["accuracy"])
    dense_bytes = report["export"]["dense_file_bytes"]
    out_dir = run_dir / "round-files"
    out_dir.mkdir(exist_ok=True)
    candidates = []
    for phase in student_phases(spec):
        if phase.kind != "prune":
            continue
        folder = run_dir / "checkpoints" / phase.name
        state = load_file(str(folder / "model.safetensors"))
        masks = {k: v.bool() for k, v in load_file(str(folder / "masks.safetensors")).items()}
        model = build_from_architecture(arch)
        kinds = layer_kinds(model, "dynamic")
        path = out_dir / f"{phase.name}-int8.safetensors"
        write_compressed(path, arch=arch, state=quantize_state(state, kinds, masks), masks=masks,
                         kinds=weight_kinds(kinds), runtime="int8_dynamic",
                         manifest={"round": phase.round, "target_sparsity": phase.target_sparsity})
        loaded, _ = load_compressed(path)
        with torch.no_grad():
            acc, _ = accuracy(loaded, data.x_test, data.y_test)
        candidates.append({"stage": f"round {phase.round} int8", "sparsity": phase.target_sparsity,
                           "error": error_of(acc), "file_bytes": path.stat().st_size})
    export = report["export"]
    candidates.append({"stage": "final qat int8", "sparsity": export["sparsity"],
                       "error": error_of(export["accuracy"]),
                       "file_bytes": export["compressed_file_bytes"]})
    for c in candidates:
        c["reduction"] = round(dense_bytes / c["file_bytes"], 2)
        c["within_0_1pt"] = (c["error"] - dense_err) * 100.0 <= HAN_MAX_DELTA_PT + 1e-9
    within = [c for c in candidates if c["within_0_1pt"]]
    return {
        "dense_error": dense_err, "dense_file_bytes": dense_bytes, "candidates": candidates,
        "best": min(within, key=lambda c: c["file_bytes"]) if within else None,
        "deep_compression": DEEP_COMPRESSION[key],
    }


def alone_spec(args: argparse.Namespace, teacher_file: Path) -> dict:
    """Job 2: the same student, same epochs, cross-entropy only (the teacher's weight is 0)."""
    raw = _common(args, "bench-mnist-alone")
    raw["teacher"] = _teacher_from(teacher_file)
    raw["distillation"] = {"kind": "hinton", "temperature": args.temperature, "alpha": 0.0}
    raw["pruning"] = {"enabled": False}
    return raw


# ---------------------------------------------------------------------------------- results


def error_of(accuracy: float) -> float:
    """Test error as a fraction; rounded so that 0.9837 gives 0.0163, not 0.016299999."""
    return round(1.0 - accuracy, 6)


def summarise(distilled: dict, alone: dict, wall: float, args: argparse.Namespace,
              run_dirs: dict, compression: dict) -> dict:
    dense_err = error_of(distilled["dense_student"]["accuracy"])
    pruned = [
        {
            "round": r["round"],
            "target_sparsity": r["target_sparsity"],
            "sparsity": r["sparsity"],
            "error": error_of(r["accuracy"]),
            "nonzero_params": r["nonzero_params"],
        }
        for r in distilled["rounds"]
    ]
    meeting = [
        p for p in pruned
        if p["sparsity"] >= HAN_SPARSITY - 1e-9
        and (p["error"] - dense_err) * 100.0 <= HAN_MAX_DELTA_PT + 1e-9
    ]
    han = {
        "sparsity_at_least": HAN_SPARSITY,
        "max_error_increase_pt": HAN_MAX_DELTA_PT,
        "met": bool(meeting),
        "first_round": meeting[0]["round"] if meeting else None,
        "best_round": max(meeting, key=lambda p: p["sparsity"])["round"] if meeting else None,
    }
    return {
        "teacher_error": error_of(distilled["teacher"]["accuracy"]),
        "student_alone_error": error_of(alone["dense_student"]["accuracy"]),
        "student_distilled_error": dense_err,
        "pruned": pruned,
        "dense_params": distilled["dense_student"]["params"],
        "wall_seconds": round(wall, 1),
        "teacher_params": distilled["teacher"]["params"],
        "han_target": han,
        "compression": compression,
        "config": {
            "train_limit": args.train_limit,
            "teacher_epochs": args.teacher_epochs,
            "student_epochs": args.student_epochs,
            "finetune_epochs": args.finetune_epochs,
            "schedule": args.schedule,
            "qat_epochs": args.qat_epochs,
            "lenet5_epochs": None if args.skip_lenet5 else args.lenet5_epochs,
            "lenet5_schedule": None if args.skip_lenet5 else args.lenet5_schedule,
            "temperature": args.temperature,
            "alpha": args.alpha,
            "teacher_lr": args.teacher_lr,
            "student_lr": args.student_lr,
            "batch_size_per_worker": args.batch_size,
            "student_workers": 2,
            "precision": "bf16",
            "zero_stage": args.zero_stage,
            "seed": args.seed,
        },
        "run_dirs": run_dirs,
    }


def format_table(result: dict) -> str:
    dense_err = result["student_distilled_error"]
    dense_params = result["dense_params"]
    header = ("model", "test error", "sparsity", "nonzero params", "kept", "vs distilled")
    rows = [
        ("teacher MLP 1200-1200", _pct(result["teacher_error"]), "-",
         f"{result['teacher_params']:,}", "-", "-"),
        ("LeNet-300-100 alone", _pct(result["student_alone_error"]), "0",
         f"{dense_params:,}", "100.0%", _delta(result["student_alone_error"], dense_err)),
        ("LeNet-300-100 distilled", _pct(dense_err), "0", f"{dense_params:,}", "100.0%",
         _delta(dense_err, dense_err)),
    ]
    for p in result["pruned"]:
        rows.append((
            f"  pruned round {p['round']} (target {p['target_sparsity']:.2f})", _pct(p["error"]),
            f"{p['sparsity']:.4f}", f"{p['nonzero_params']:,}",
            f"{100.0 * p['nonzero_params'] / dense_params:.1f}%", _delta(p["error"], dense_err),
        ))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(row) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths)))

    out = [line(header), "  ".join("-" * w for w in widths), *map(line, rows), ""]
    out.append("sparsity: zero share of the pruned Linear weights; nonzero params and kept: "
               "all parameters, biases included; vs distilled: test error minus the dense "
               "distilled student's, in percentage points")
    han = result["han_target"]
    target = (f"Han et al. target (>= {HAN_SPARSITY:.0%} of weights removed at <= "
              f"+{HAN_MAX_DELTA_PT} pt error over the dense student)")
    if han["met"]:
        best = next(p for p in result["pruned"] if p["round"] == han["best_round"])
        out.append(f"{target}: MET, first by round {han['first_round']}; best round "
                   f"{han['best_round']}: sparsity {best['sparsity']:.4f}, error "
                   f"{_pct(best['error'])} ({_delta(best['error'], dense_err)}), "
                   f"{dense_params / best['nonzero_params']:.1f}x fewer parameters")
    else:
        out.append(f"{target}: NOT met")
    for key, label in (("lenet300", "LeNet-300-100"), ("lenet5", "LeNet-5")):
        c = result["compression"].get(key)
        if c is None:
            continue
        out += ["", f"{label} model files (dense fp32 student: {c['dense_file_bytes']:,} bytes, "
                f"error {_pct(c['dense_error'])}):"]
        for cand in c["candidates"]:
            out.append(f"  {cand['stage']:<18} sparsity {cand['sparsity']:.3f}  error "
                       f"{_pct(cand['error'])} ({_delta(cand['error'], c['dense_error'])})  "
                       f"{cand['file_bytes']:>9,} bytes  {cand['reduction']:5.1f}x"
                       f"{'' if cand['within_0_1pt'] else '  (over +0.1 pt)'}")
        best = c["best"]
        out.append(f"  best within +0.1 pt: {best['stage']}, {best['reduction']:.1f}x smaller "
                   f"(Deep Compression: {c['deep_compression']:.0f}x)" if best else
                   "  best within +0.1 pt: none")
    out.append(f"wall time: {result['wall_seconds']:.0f} s")
    return "\n".join(out)


def _pct(error: float) -> str:
    return f"{100.0 * error:.2f}%"


def _delta(error: float, reference: float) -> str:
    return f"{100.0 * (error - reference):+.2f} pt"


# -------------------------------------------------------------------------------------- main


def _sparsities(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("the schedule lists no sparsities")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="MNIST: distil LeNet-300-100 from a 1200-1200 MLP, prune it, print a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"),
                   help="folder holding mnist/ (the four IDX .gz files)")
    p.add_argument("--work-dir", default=str(PROJECT_ROOT / "runs" / "bench-mnist"),
                   help="run dirs go under WORK_DIR/RUN_NAME/")
    p.add_argument("--run-name", default=None,
                   help="subfolder of --work-dir (default: a time stamp); an existing one resumes")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results here")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--student-epochs", type=int, default=15,
                   help="dense epochs, the same for the alone and the distilled student")
    p.add_argument("--finetune-epochs", type=int, default=3, help="distilled epochs per round")
    p.add_argument("--schedule", type=_sparsities, default=[0.5, 0.75, 0.85, 0.9, 0.92, 0.95],
                   help="comma-separated sparsity after each pruning round, increasing")
    p.add_argument("--qat-epochs", type=int, default=2,
                   help="quantization-aware distillation epochs after the last round")
    p.add_argument("--lenet5-epochs", type=int, default=8, help="LeNet-5 dense epochs")
    p.add_argument("--lenet5-schedule", type=_sparsities, default=[0.5, 0.75, 0.85, 0.9, 0.92],
                   help="LeNet-5's sparsity after each pruning round")
    p.add_argument("--skip-lenet5", action="store_true", help="leave job 3 out")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--alpha", type=float, default=0.7, help="weight of the distillation term")
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--student-lr", type=float, default=2e-3)
    p.add_argument("--batch-size", type=int, default=128, help="per worker (2 workers)")
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=int, default=None,
                   help="use only the first N training images (data.train_limit), for smoke runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from orchestrator.job import run_job

    run_name = args.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    base = Path(args.work_dir).resolve() / run_name
    run_dirs = {"distilled": str(base / "distilled"), "alone": str(base / "alone"),
                "lenet5": str(base / "lenet5")}
    spec1 = parse_spec(distilled_spec(args), source="bench job 1 (distilled)")  # fail fast
    started = time.perf_counter()

    print(f"[bench] job 1/3: teacher, distilled student, {len(args.schedule)} pruning rounds, "
          f"QAT -> {run_dirs['distilled']}", flush=True)
    distilled = run_job(spec1, data_dir=args.data_dir, run_dir=run_dirs["distilled"])

    teacher_file = Path(run_dirs["distilled"]) / "checkpoints" / "teacher" / "model.safetensors"
    spec2 = parse_spec(alone_spec(args, teacher_file), source="bench job 2 (alone)")
    print(f"[bench] job 2/3: student trained alone -> {run_dirs['alone']}", flush=True)
    alone = run_job(spec2, data_dir=args.data_dir, run_dir=run_dirs["alone"])

    from trainers.data import load_dataset

    data = load_dataset(spec1.data, args.data_dir, spec1.seed)
    compression = {"lenet300": file_candidates(distilled, Path(run_dirs["distilled"]), data,
                                               "lenet300")}
    if not args.skip_lenet5:
        spec3 = parse_spec(lenet5_spec(args, teacher_file), source="bench job 3 (lenet5)")
        print(f"[bench] job 3/3: LeNet-5 distilled, {len(args.lenet5_schedule)} pruning rounds, "
              f"QAT -> {run_dirs['lenet5']}", flush=True)
        lenet5 = run_job(spec3, data_dir=args.data_dir, run_dir=run_dirs["lenet5"])
        compression["lenet5"] = file_candidates(lenet5, Path(run_dirs["lenet5"]), data, "lenet5")

    result = summarise(distilled, alone, time.perf_counter() - started, args, run_dirs,
                       compression)
    print("\n" + format_table(result), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] results written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
