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

Two stillhouse jobs, each on its own embedded local Ray cluster (`orchestrator.job.run_job`):

1. `distilled`: trains the teacher, distils the dense student, runs every pruning round;
2. `alone`: the student trained alone (`distillation.alpha: 0`, pruning disabled), with the
   teacher loaded from job 1's checkpoint so it is not trained again (the teacher pool still
   serves logits, which get zero weight).

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
    raw["distillation"] = {"kind": "hinton", "temperature": args.temperature, "alpha": args.alpha}
    raw["pruning"] = {
        "enabled": True,
        "target_sparsity": args.schedule[-1],
        "rounds": len(args.schedule),
        "finetune_epochs": args.finetune_epochs,
        "schedule": {"kind": "explicit", "sparsities": args.schedule},
    }
    return raw


def alone_spec(args: argparse.Namespace, teacher_file: Path) -> dict:
    """Job 2: the same student, same epochs, cross-entropy only (the teacher's weight is 0)."""
    raw = _common(args, "bench-mnist-alone")
    raw["teacher"] = {
        "kind": "checkpoint",
        "model": {"kind": "mlp", "hidden": TEACHER_HIDDEN},
        "path": str(teacher_file),
    }
    raw["distillation"] = {"kind": "hinton", "temperature": args.temperature, "alpha": 0.0}
    raw["pruning"] = {"enabled": False}
    return raw


# ---------------------------------------------------------------------------------- results


def error_of(accuracy: float) -> float:
    """Test error as a fraction; rounded so that 0.9837 gives 0.0163, not 0.016299999."""
    return round(1.0 - accuracy, 6)


def summarise(distilled: dict, alone: dict, wall: float, args: argparse.Namespace,
              run_dirs: dict) -> dict:
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
        "config": {
            "train_limit": args.train_limit,
            "teacher_epochs": args.teacher_epochs,
            "student_epochs": args.student_epochs,
            "finetune_epochs": args.finetune_epochs,
            "schedule": args.schedule,
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
    run_dirs = {"distilled": str(base / "distilled"), "alone": str(base / "alone")}
    spec1 = parse_spec(distilled_spec(args), source="bench job 1 (distilled)")  # fail fast
    started = time.perf_counter()

    print(f"[bench] job 1/2: teacher, distilled student, {len(args.schedule)} pruning rounds "
          f"-> {run_dirs['distilled']}", flush=True)
    distilled = run_job(spec1, data_dir=args.data_dir, run_dir=run_dirs["distilled"])

    teacher_file = Path(run_dirs["distilled"]) / "checkpoints" / "teacher" / "model.safetensors"
    spec2 = parse_spec(alone_spec(args, teacher_file), source="bench job 2 (alone)")
    print(f"[bench] job 2/2: student trained alone -> {run_dirs['alone']}", flush=True)
    alone = run_job(spec2, data_dir=args.data_dir, run_dir=run_dirs["alone"])

    result = summarise(distilled, alone, time.perf_counter() - started, args, run_dirs)
    print("\n" + format_table(result), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] results written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
