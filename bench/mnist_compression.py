"""MNIST compression benchmark: distil LeNet-300-100 and LeNet-5 from a CNN teacher, prune them,
share their weights, over several seeds.

Not a test and not run in CI: it trains on full MNIST, three jobs per seed, and takes tens of
minutes on two CPU cores.

The jobs are the example specs, run through `orchestrator.job.run_job` (command-line options
below override their fields):

1. `distilled` (`examples/mnist-lenet300.yaml`): trains the teacher (LeNet-5 on images shifted
   by up to 2 pixels, `data.augment`), distils LeNet-300-100 from the teacher's answers (online
   in that spec: the teacher sees each shifted batch the student sees), prunes it round by round
   with distilled fine-tuning (on the images as stored in that spec: `pruning.augment`, their
   logits read from the cache, `logits.cache_unaugmented`), then fine-tunes the k-means shared
   weights (`quantization.method: kmeans`) and writes the compact file;
2. `alone`: the same spec with `distillation.alpha: 0` (cross-entropy only: the same epochs,
   learning rate, seed and data order) and *without* `data.augment` or the student's
   `weight_decay` (no regularisation), pruning and quantization off, and the teacher loaded
   from job 1's file (trained once per seed; it is only scored).
   Its one worker takes the CPUs job 1's student and replica shared (the replica has left).
   This is the student "trained alone" of Hinton et al. (2015): no regularisation, unshifted
   images, and the one the gap closed is measured against;
2b. `alone-shifted` (only when job 1's spec shifts its images): job 2 with job 1's
   `data.augment` and weight decay, so that the share of the gain that the student's own
   regularisation gives is measured beside the share of distillation
   (`student_alone_shifted_error`, `gap_closed_vs_shifted`);
3. `lenet5` (`examples/mnist-lenet5.yaml`): LeNet-5 distilled from job 1's teacher (from the
   logit cache job 1 filled: same teacher, images as stored), pruned and weight-shared by its own schedule
   (`--skip-lenet5` leaves it out).

All jobs of an invocation share one embedded Ray cluster. Each seed (`--seeds N` seeds from
`--seed`) runs all three jobs with `seed` set to it, so the teacher, both students, the data
order and the initial weights differ from seed to seed.

What it measures, on the 10,000-image MNIST test set: test errors of the teacher, of the student
alone and distilled, of every pruning round, and of the model files: for each pruning round a
post-training weight-shared file (k-means of the round's weights, no fine-tuning) and the job's
own file after the fine-tuned weight sharing. Every headline figure is the mean over the seeds,
with the sample standard deviation across seeds (`_sd`) and the test set's binomial standard
error sqrt(p (1 - p) / 10000) of the mean error (`_se`): the noise of one test set, which the
seeds do not average away. A claim "at <= +0.1 pt" compares means: a round or file qualifies
when its mean error is at most 0.1 percentage point over the dense distilled student's mean.

Run it from the project root:

    .venv/bin/python bench/mnist_compression.py --seeds 3 --json bench/results/mnist.json

    # a quick smoke run (a few minutes): 5,000 training images, one epoch per stage
    .venv/bin/python bench/mnist_compression.py --seeds 1 --train-limit 5000 --teacher-epochs 1 \\
        --student-epochs 1 --finetune-epochs 1 --quantize-epochs 1 --lenet5-epochs 1 \\
        --json bench/results/smoke.json

Run dirs go under `<work-dir>/<run-name>/seed-<S>/{distilled,alone,lenet5}` (`--run-name`
defaults to a time stamp, so each invocation starts fresh). Giving the `--run-name` of an
interrupted run with the same options resumes it after its last finished stage;
`wall_seconds` then only counts this invocation.

With `--json FILE` it writes one JSON object. Keys without a suffix are those a one-seed run
always wrote, and hold the first seed's figures; `_mean`, `_sd` and `_se` keys are over all seeds:

    seeds                    the seeds run
    teacher_error            test error of the teacher (first seed), a fraction of the test set;
                             teacher_error_mean, _sd, _se over the seeds
    student_alone_error      LeNet-300-100 trained alone (cross-entropy only, unshifted images,
                             no weight decay); also _mean, _sd, _se
    student_alone_shifted_error
                             the same on job 1's shifted images with job 1's weight decay
                             (job 2b); also _mean, _sd, _se; absent when job 1 does not shift
                             its images
    student_distilled_error  LeNet-300-100 distilled (dense, before pruning); also _mean, _sd, _se
    gap_closed               (alone - distilled) / (alone - teacher) of the mean errors;
                             gap_closed_per_seed: the same per seed
    gap_closed_vs_shifted    the same against the student alone on shifted images (job 2b):
                             what distillation adds over the student's own regularisation
    pruned                   LeNet-300-100, one entry per pruning round, in order:
                               round, target_sparsity
                               sparsity         share of zero weights among the prunable weights
                                                (all Linear weights; biases are not pruned),
                                                first seed; sparsity_mean over the seeds
                               error            test error after the round's fine-tuning, first
                                                seed; error_mean, error_sd, error_se
                               nonzero_params   nonzero parameters, biases included (first seed)
                               delta_pt         error_mean minus the dense distilled student's
                                                mean, in percentage points
                               within_0_1pt     delta_pt <= 0.1
    lenet5_pruned            the same for LeNet-5 (its deltas against the dense distilled LeNet-5)
    sparsity_within_0_1pt    per model ("lenet300", "lenet5"): the highest mean sparsity of a
                             round within +0.1 pt, or null
    dense_params             parameters of the dense LeNet-300-100, biases included (266,610)
    teacher_params           parameters of the teacher
    wall_seconds             wall time of this invocation, every job and export together
    load_average             the machine's 1-minute load average when the run started and ended
                             (other processes slow a shared machine down)
    files                    one entry per model file kind, over the seeds: model, stage
                             ("round N kmeans" or "final kmeans fine-tuned"), bits (mean bits per
                             stored weight), sparsity (mean), bytes (mean file size),
                             ratio_vs_dense (the dense fp32 student file's bytes / bytes),
                             error_mean, error_sd, error_se, delta_pt (against the model's dense
                             distilled mean), within_0_1pt
    compression              per model ("lenet300", "lenet5"):
                               dense_error       the dense distilled student's test error (first
                                                 seed); dense_error_mean over the seeds
                               dense_file_bytes  its fp32 safetensors file
                               candidates        the files' entries of that model
                               best              the smallest file within +0.1 pt, or null
                               deep_compression  the reduction Han et al. 2016 report (40 / 39)
    goals                    each goal of the benchmark: measure, goal, value, met
    han_target               whether >= 92 % sparsity was reached within +0.1 pt (means), and by
                             which round
    per_seed                 every seed's own figures (the same keys, one seed each), job wall
                             times and run dirs
    config                   the options and the resolved job settings
    run_dirs                 the first seed's run dirs

The published anchors: Hinton et al. 2015 (MNIST teacher 0.67 %, a small net alone 1.46 %,
distilled 0.74 %: 91 % of the gap closed); Han et al. 2015 (LeNet-300-100 with 92 % of its
weights removed at 1.59 % against 1.64 % dense; LeNet-5 92 %); Deep Compression, Han et al.
2016 (pruning, 5-8 bit weight sharing and Huffman coding: files 40x smaller for LeNet-300-100,
39x for LeNet-5).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
if str(PROJECT_ROOT) not in sys.path:  # run as a script: make `specs`, `orchestrator` importable
    sys.path.insert(0, str(PROJECT_ROOT))

from specs import parse_spec  # noqa: E402

TEST_ROWS = 10_000  # MNIST's test set: the binomial standard error's n
HAN_SPARSITY = 0.92  # Han et al. (2015): LeNet-300-100 pruned 12x (92 % of the weights)
MAX_DELTA_PT = 0.1  # allowed error increase over the dense distilled student, percentage points
DEEP_COMPRESSION = {"lenet300": 40.0, "lenet5": 39.0}  # Han et al. 2016, file size reduction
GOALS = {  # the benchmark's goals (the anchors they answer in the docstring)
    "teacher_error": 0.008,
    "gap_closed": 0.60,
    "sparsity_lenet300": 0.95,
    "sparsity_lenet5": 0.95,
    "ratio_lenet300": 40.0,
    "ratio_lenet5": 39.0,
}
MODELS = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}


# ------------------------------------------------------------------------------------ specs


def _example(path: str) -> dict:
    return yaml.safe_load(Path(path).read_text())


def _override(raw: dict, args: argparse.Namespace, seed: int, name: str, *, epochs: int | None,
              schedule: list[float] | None) -> dict:
    """The example spec with the seed, a bench name, W&B off and the command line's overrides."""
    raw = json.loads(json.dumps(raw))  # a deep copy
    raw.update(name=f"{name}-s{seed}", seed=seed, wandb={"mode": "disabled"})
    raw.pop("run_dir", None)
    raw.pop("sweep", None)
    if args.train_limit is not None:
        raw["data"]["train_limit"] = args.train_limit
    student = raw["student"]
    for key, value in (("epochs", epochs), ("lr", args.student_lr),
                       ("batch_size", args.batch_size)):
        if value is not None:
            student[key] = value
    kd = raw.setdefault("distillation", {"kind": "hinton"})
    for key, value in (("temperature", args.temperature), ("alpha", args.alpha)):
        if value is not None:
            kd[key] = value
    pruning = raw.setdefault("pruning", {})
    if schedule is not None:
        pruning.update(target_sparsity=schedule[-1], rounds=len(schedule),
                       schedule={"kind": "explicit", "sparsities": schedule})
    if args.finetune_epochs is not None:
        pruning["finetune_epochs"] = args.finetune_epochs
    if args.quantize_epochs is not None:
        raw.setdefault("quantization", {})["finetune_epochs"] = args.quantize_epochs
    return raw


def distilled_spec(args: argparse.Namespace, seed: int) -> dict:
    """Job 1: train the teacher, distil the dense LeNet-300-100, prune it, share its weights."""
    raw = _override(_example(args.spec), args, seed, "bench-mnist-distilled",
                    epochs=args.student_epochs, schedule=args.schedule)
    teacher = raw["teacher"]
    if teacher["kind"] != "train":
        raise SystemExit(f"{args.spec}: the benchmark trains its teacher (`teacher.kind: train`)")
    for key, value in (("epochs", args.teacher_epochs), ("lr", args.teacher_lr)):
        if value is not None:
            teacher[key] = value
    return raw


def _teacher_from(job1: dict, teacher_file: Path) -> dict:
    """Job 1's trained teacher, loaded from its file by jobs 2 and 3."""
    return {"kind": "checkpoint", "model": job1["teacher"]["model"], "path": str(teacher_file)}


def shifts_images(job1: dict) -> bool:
    """Whether job 1's student trains on augmented images (`data.augment` switched on)."""
    augment = job1.get("data", {}).get("augment") or {}
    return bool(augment.get("random_crop_padding", 0) or augment.get("hflip", False))


def alone_spec(job1: dict, teacher_file: Path, *, shifted: bool = False) -> dict:
    """Job 2: job 1's student, epochs and data, cross-entropy only (the teacher's weight is 0),
    on the images as stored and without weight decay; `shifted` (job 2b) keeps job 1's
    `data.augment` and `student.weight_decay`."""
    raw = json.loads(json.dumps(job1))
    raw["name"] = job1["name"].replace("distilled", "alone-shifted" if shifted else "alone")
    raw["teacher"] = _teacher_from(job1, teacher_file)
    if not shifted:
        raw["data"].pop("augment", None)
        raw["student"].pop("weight_decay", None)
    raw["distillation"] = {**raw.get("distillation", {}), "alpha": 0.0, "features": []}
    raw["pruning"] = {"enabled": False}
    raw["quantization"] = {"method": "none"}
    # its replicas leave before its one worker starts: that worker takes the CPUs job 1's
    # student and replicas share (the same steps either way; only faster)
    r = raw["resources"]
    r["student_cpus"] = (r["teacher_replicas"] * r["teacher_cpus"]
                         + r["student_workers"] * r["student_cpus"]) / r["student_workers"]
    return raw


def lenet5_spec(args: argparse.Namespace, seed: int, job1: dict, teacher_file: Path) -> dict:
    """Job 3: LeNet-5 distilled from job 1's teacher, pruned by its own schedule, weight-shared."""
    raw = _override(_example(args.lenet5_spec), args, seed, "bench-mnist-lenet5",
                    epochs=args.lenet5_epochs, schedule=args.lenet5_schedule)
    raw["teacher"] = _teacher_from(job1, teacher_file)
    return raw


# ------------------------------------------------------------------------------ model files


def file_candidates(report: dict, run_dir: Path, data) -> list[dict]:
    """Every pruning round's weights as a post-training weight-shared file (k-means of the
    round's kept weights with the spec's bits, no fine-tuning), written and reloaded as the job's
    own export is; and the job's own file, after the fine-tuned weight sharing."""
    import torch
    from safetensors.torch import load_file

    from specs import load_spec
    from trainers.export import accuracy, load_compressed, write_compressed
    from trainers.models import architecture, build_from_architecture
    from trainers.plan import student_phases
    from trainers.quantize import layer_kinds, quantize_state, weight_kinds

    spec = load_spec(run_dir / "spec.yaml")
    arch = architecture(spec.student.model, data.image_shape, data.num_classes)
    out_dir = run_dir / "round-files"
    out_dir.mkdir(exist_ok=True)
    candidates = []
    for phase in student_phases(spec):
        if phase.kind != "prune":
            continue
        folder = run_dir / "checkpoints" / phase.name
        state = load_file(str(folder / "model.safetensors"))
        masks = {k: v.bool() for k, v in load_file(str(folder / "masks.safetensors")).items()}
        kinds = layer_kinds(build_from_architecture(arch), "kmeans", spec.quantization.bits)
        shared = quantize_state(state, kinds, masks)
        path = out_dir / f"{phase.name}-kmeans.safetensors"
        layout = write_compressed(
            path, arch=arch, state=shared, masks=masks, kinds=weight_kinds(kinds), runtime="fp32",
            manifest={"round": phase.round, "target_sparsity": phase.target_sparsity},
            entropy_coding=spec.export.entropy_coding)
        loaded, _ = load_compressed(path)
        with torch.no_grad():
            acc, _ = accuracy(loaded, data.x_test, data.y_test)
        candidates.append({"stage": f"round {phase.round} kmeans", "sparsity": phase.target_sparsity,
                           "bits": _mean_bits(layout), "error": error_of(acc),
                           "file_bytes": path.stat().st_size})
    export = report["export"]
    candidates.append({"stage": f"final {export['method']['quantization']} fine-tuned",
                       "sparsity": export["sparsity"], "bits": export["bits"],
                       "error": error_of(export["accuracy"]),
                       "file_bytes": export["compressed_file_bytes"]})
    return candidates


def _mean_bits(layout: dict) -> float:
    """Bits per stored weight of a weight-shared file: the code widths over the kept weights."""
    shared = [info for info in layout.values() if "bits" in info]
    kept = sum(info["nnz"] for info in shared)
    return round(sum(info["bits"] * info["nnz"] for info in shared) / max(1, kept), 2)


# ---------------------------------------------------------------------------------- results


def error_of(accuracy: float) -> float:
    """Test error as a fraction; rounded so that 0.9837 gives 0.0163, not 0.016299999."""
    return round(1.0 - accuracy, 6)


def test_se(error: float) -> float:
    """The binomial standard error of an error rate measured on the 10k test images."""
    return math.sqrt(error * (1.0 - error) / TEST_ROWS)


def _stats(values: list[float], prefix: str) -> dict:
    """`prefix`_mean, _sd (sample standard deviation over seeds; 0 for one seed) and _se (the
    test set's standard error of the mean error)."""
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {f"{prefix}_mean": round(mean, 6), f"{prefix}_sd": round(sd, 6),
            f"{prefix}_se": round(test_se(mean), 6)}


def _pt(error: float, reference: float) -> float:
    return round(100.0 * (error - reference), 4)


def seed_result(seed: int, distilled: dict, alone: dict, alone_shifted: dict | None,
                lenet5: dict | None, files: dict, walls: dict, run_dirs: dict) -> dict:
    """One seed's figures (the keys a one-seed run always wrote)."""
    def rounds(report: dict) -> list[dict]:
        return [{"round": r["round"], "target_sparsity": r["target_sparsity"],
                 "sparsity": r["sparsity"], "error": error_of(r["accuracy"]),
                 "nonzero_params": r["nonzero_params"]} for r in report["rounds"]]

    teacher = error_of(distilled["teacher"]["accuracy"])
    alone_err = error_of(alone["dense_student"]["accuracy"])
    dense = error_of(distilled["dense_student"]["accuracy"])
    result = {
        "seed": seed, "teacher_error": teacher, "student_alone_error": alone_err,
        "student_distilled_error": dense,
        "gap_closed": round((alone_err - dense) / (alone_err - teacher), 4)
        if alone_err != teacher else None,
        "pruned": rounds(distilled), "dense_params": distilled["dense_student"]["params"],
        "teacher_params": distilled["teacher"]["params"],
        "compression": {"lenet300": {
            "dense_error": dense, "dense_file_bytes": distilled["export"]["dense_file_bytes"],
            "candidates": files["lenet300"]}},
        "job_wall_seconds": walls, "run_dirs": run_dirs,
    }
    if alone_shifted is not None:
        shifted = error_of(alone_shifted["dense_student"]["accuracy"])
        result["student_alone_shifted_error"] = shifted
        result["gap_closed_vs_shifted"] = (round((shifted - dense) / (shifted - teacher), 4)
                                           if shifted != teacher else None)
    if lenet5 is not None:
        result["lenet5_pruned"] = rounds(lenet5)
        result["compression"]["lenet5"] = {
            "dense_error": error_of(lenet5["dense_student"]["accuracy"]),
            "dense_file_bytes": lenet5["export"]["dense_file_bytes"],
            "candidates": files["lenet5"]}
    return result


def _rounds_over_seeds(per_seed: list[dict], key: str, dense_mean: float) -> list[dict]:
    first = per_seed[0][key]
    out = []
    for i, entry in enumerate(first):
        errors = [s[key][i]["error"] for s in per_seed]
        stats = _stats(errors, "error")
        delta = _pt(stats["error_mean"], dense_mean)
        out.append({**entry, **stats,
                    "sparsity_mean": round(statistics.fmean(s[key][i]["sparsity"] for s in per_seed), 6),
                    "delta_pt": delta, "within_0_1pt": delta <= MAX_DELTA_PT + 1e-9})
    return out


def _files_over_seeds(per_seed: list[dict], model: str, dense_mean: float) -> list[dict]:
    first = per_seed[0]["compression"][model]
    dense_bytes = statistics.fmean(s["compression"][model]["dense_file_bytes"] for s in per_seed)
    out = []
    for i, cand in enumerate(first["candidates"]):
        runs = [s["compression"][model]["candidates"][i] for s in per_seed]
        bytes_mean = statistics.fmean(c["file_bytes"] for c in runs)
        stats = _stats([c["error"] for c in runs], "error")
        delta = _pt(stats["error_mean"], dense_mean)
        out.append({
            "model": model, "stage": cand["stage"],
            "bits": round(statistics.fmean(c["bits"] for c in runs), 2),
            "sparsity": round(statistics.fmean(c["sparsity"] for c in runs), 6),
            "bytes": round(bytes_mean), "ratio_vs_dense": round(dense_bytes / bytes_mean, 2),
            **stats, "delta_pt": delta, "within_0_1pt": delta <= MAX_DELTA_PT + 1e-9,
        })
    return out


def summarise(per_seed: list[dict], wall: float, load: list[float], config: dict) -> dict:
    first = per_seed[0]
    stats = {}
    for key in ("teacher_error", "student_alone_error", "student_distilled_error"):
        stats.update(_stats([s[key] for s in per_seed], key))
    t, a, d = (stats[f"{k}_mean"] for k in ("teacher_error", "student_alone_error",
                                             "student_distilled_error"))
    gap = round((a - d) / (a - t), 4) if a != t else None
    shifted = {}
    if "student_alone_shifted_error" in first:
        shifted = _stats([s["student_alone_shifted_error"] for s in per_seed],
                         "student_alone_shifted_error")
        sa = shifted["student_alone_shifted_error_mean"]
        shifted = {"student_alone_shifted_error": first["student_alone_shifted_error"], **shifted,
                   "gap_closed_vs_shifted": round((sa - d) / (sa - t), 4) if sa != t else None,
                   "gap_closed_vs_shifted_per_seed": [s["gap_closed_vs_shifted"]
                                                      for s in per_seed]}
    pruned = _rounds_over_seeds(per_seed, "pruned", d)
    compression, files = {}, []
    best_sparsity = {"lenet300": _best_sparsity(pruned)}
    lenet5_pruned = None
    for model in ("lenet300", "lenet5"):
        if model not in first["compression"]:
            continue
        dense_mean = statistics.fmean(s["compression"][model]["dense_error"] for s in per_seed)
        if model == "lenet5":
            lenet5_pruned = _rounds_over_seeds(per_seed, "lenet5_pruned", dense_mean)
            best_sparsity["lenet5"] = _best_sparsity(lenet5_pruned)
        cands = _files_over_seeds(per_seed, model, dense_mean)
        files += cands
        within = [c for c in cands if c["within_0_1pt"]]
        compression[model] = {
            "dense_error": first["compression"][model]["dense_error"],
            "dense_error_mean": round(dense_mean, 6), "dense_error_se": round(test_se(dense_mean), 6),
            "dense_file_bytes": first["compression"][model]["dense_file_bytes"],
            "candidates": cands,
            "best": min(within, key=lambda c: c["bytes"]) if within else None,
            "deep_compression": DEEP_COMPRESSION[model],
        }
    meeting = [p for p in pruned if p["sparsity_mean"] >= HAN_SPARSITY - 1e-9 and p["within_0_1pt"]]
    han = {
        "sparsity_at_least": HAN_SPARSITY, "max_error_increase_pt": MAX_DELTA_PT,
        "on": "mean errors over the seeds", "met": bool(meeting),
        "first_round": meeting[0]["round"] if meeting else None,
        "best_round": max(meeting, key=lambda p: p["sparsity_mean"])["round"] if meeting else None,
    }
    result = {
        "seeds": [s["seed"] for s in per_seed],
        "teacher_error": first["teacher_error"],
        "student_alone_error": first["student_alone_error"],
        "student_distilled_error": first["student_distilled_error"],
        **stats,
        "gap_closed": gap,
        "gap_closed_per_seed": [s["gap_closed"] for s in per_seed],
        **shifted,
        "pruned": pruned,
        **({"lenet5_pruned": lenet5_pruned} if lenet5_pruned is not None else {}),
        "sparsity_within_0_1pt": best_sparsity,
        "dense_params": first["dense_params"],
        "teacher_params": first["teacher_params"],
        "wall_seconds": round(wall, 1),
        "load_average": load,
        "files": files,
        "compression": compression,
        "han_target": han,
        "config": config,
        "run_dirs": first["run_dirs"],
        "per_seed": per_seed,
    }
    result["goals"] = goals(result)
    return result


def _best_sparsity(rounds: list[dict]) -> float | None:
    within = [p["sparsity_mean"] for p in rounds if p["within_0_1pt"]]
    return max(within) if within else None


def goals(result: dict) -> list[dict]:
    """Each goal with the measured value (means over the seeds) and whether it is met."""
    rows = [
        ("teacher test error", "<=", GOALS["teacher_error"], result["teacher_error_mean"]),
        ("LeNet-300-100 gap closed", ">=", GOALS["gap_closed"], result["gap_closed"]),
    ]
    for model in ("lenet300", "lenet5"):
        if model not in result["compression"]:
            continue
        rows.append((f"{MODELS[model]} sparsity at <= +0.1 pt", ">=", GOALS[f"sparsity_{model}"],
                     result["sparsity_within_0_1pt"].get(model)))
        best = result["compression"][model]["best"]
        rows.append((f"{MODELS[model]} file vs dense fp32 at <= +0.1 pt", ">=",
                     GOALS[f"ratio_{model}"], best["ratio_vs_dense"] if best else None))
    out = []
    for measure, sense, goal, value in rows:
        met = value is not None and (value <= goal if sense == "<=" else value >= goal)
        out.append({"measure": measure, "goal": f"{sense} {goal:g}", "value": value, "met": met})
    return out


# ------------------------------------------------------------------------------------ table


def _pct(error: float) -> str:
    return f"{100.0 * error:.2f}%"


def _mean_sd(entry: dict, key: str) -> str:
    return (f"{100 * entry[f'{key}_mean']:.2f}% ± {100 * entry[f'{key}_sd']:.2f} "
            f"(se {100 * entry[f'{key}_se']:.2f})")


def format_table(result: dict) -> str:
    n = len(result["seeds"])
    out = [f"MNIST, {n} seed(s) {result['seeds']}: mean test error ± sd over the seeds "
           "(se: the 10k test set's standard error of the mean)", ""]
    out.append(f"teacher LeNet-5             {_mean_sd(result, 'teacher_error')}")
    out.append(f"LeNet-300-100 alone         {_mean_sd(result, 'student_alone_error')}")
    out.append(f"LeNet-300-100 distilled     {_mean_sd(result, 'student_distilled_error')}")
    out.append(f"gap closed (of the means)   {100 * result['gap_closed']:.0f}%  per seed "
               + ", ".join(f"{100 * g:.0f}%" for g in result["gap_closed_per_seed"]))
    if "gap_closed_vs_shifted" in result:
        out.append(f"LeNet-300-100 alone, shifted {_mean_sd(result, 'student_alone_shifted_error')}")
        out.append(f"gap closed vs alone shifted {100 * result['gap_closed_vs_shifted']:.0f}%  "
                   "per seed " + ", ".join(f"{100 * g:.0f}%"
                                           for g in result["gap_closed_vs_shifted_per_seed"]))
    for key, label in (("pruned", "LeNet-300-100"), ("lenet5_pruned", "LeNet-5")):
        if key not in result:
            continue
        out += ["", f"{label} pruning rounds (vs the dense distilled mean):"]
        for p in result[key]:
            out.append(f"  round {p['round']}  sparsity {p['sparsity_mean']:.4f}  "
                       f"{_mean_sd(p, 'error')}  {p['delta_pt']:+.2f} pt"
                       f"{'' if p['within_0_1pt'] else '  (over +0.1 pt)'}")
    for model, c in result["compression"].items():
        out += ["", f"{MODELS[model]} files (dense fp32: {c['dense_file_bytes']:,} bytes; dense "
                f"distilled error {_pct(c['dense_error_mean'])}, se {_pct(c['dense_error_se'])}):"]
        for f in c["candidates"]:
            out.append(f"  {f['stage']:<26} sparsity {f['sparsity']:.3f}  {f['bits']:.2f} bits  "
                       f"{f['bytes']:>9,} bytes  {f['ratio_vs_dense']:5.1f}x  "
                       f"{_mean_sd(f, 'error')}  {f['delta_pt']:+.2f} pt"
                       f"{'' if f['within_0_1pt'] else '  (over +0.1 pt)'}")
        best = c["best"]
        out.append(f"  best within +0.1 pt: {best['stage']}, {best['ratio_vs_dense']:.1f}x "
                   f"(Deep Compression: {c['deep_compression']:.0f}x)" if best else
                   "  best within +0.1 pt: none")
    out += ["", "goals (means over the seeds):"]
    for g in result["goals"]:
        value = g["value"]
        shown = "-" if value is None else (f"{value:.4g}")
        out.append(f"  {g['measure']:<48} {g['goal']:<8} {shown:>8}  "
                   f"{'met' if g['met'] else 'NOT met'}")
    out.append(f"wall time: {result['wall_seconds']:.0f} s; load average at start and end: "
               f"{result['load_average']}")
    return "\n".join(out)


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
        description="MNIST: LeNet-300-100 and LeNet-5 distilled from a LeNet-5 teacher, pruned "
                    "and weight-shared, over several seeds; prints a table.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"),
                   help="folder holding mnist/ (the four IDX .gz files)")
    p.add_argument("--work-dir", default=str(PROJECT_ROOT / "runs" / "bench-mnist"),
                   help="run dirs go under WORK_DIR/RUN_NAME/")
    p.add_argument("--run-name", default=None,
                   help="subfolder of --work-dir (default: a time stamp); an existing one resumes")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results here")
    p.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed on")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--spec", default=str(PROJECT_ROOT / "examples" / "mnist-lenet300.yaml"),
                   help="job 1's spec (teacher and LeNet-300-100); job 2 is derived from it")
    p.add_argument("--lenet5-spec", default=str(PROJECT_ROOT / "examples" / "mnist-lenet5.yaml"),
                   help="job 3's spec (its teacher is replaced by job 1's)")
    p.add_argument("--skip-lenet5", action="store_true", help="leave job 3 out")
    over = p.add_argument_group("overrides of the specs' fields (default: as the spec says)")
    over.add_argument("--teacher-epochs", type=int, default=None)
    over.add_argument("--teacher-lr", type=float, default=None)
    over.add_argument("--student-epochs", type=int, default=None,
                      help="LeNet-300-100's dense epochs, alone and distilled")
    over.add_argument("--student-lr", type=float, default=None, help="both students")
    over.add_argument("--batch-size", type=int, default=None, help="both students, per worker")
    over.add_argument("--finetune-epochs", type=int, default=None,
                      help="distilled epochs per pruning round, both students")
    over.add_argument("--schedule", type=_sparsities, default=None,
                      help="LeNet-300-100's sparsity after each round, comma-separated")
    over.add_argument("--quantize-epochs", type=int, default=None,
                      help="weight-sharing fine-tuning epochs, both students")
    over.add_argument("--lenet5-epochs", type=int, default=None, help="LeNet-5's dense epochs")
    over.add_argument("--lenet5-schedule", type=_sparsities, default=None,
                      help="LeNet-5's sparsity after each round")
    over.add_argument("--temperature", type=float, default=None, help="both students")
    over.add_argument("--alpha", type=float, default=None,
                      help="weight of the distillation term, both distilled students")
    over.add_argument("--train-limit", type=int, default=None,
                      help="use only the first N training images (data.train_limit), for smoke runs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seeds < 1:
        raise SystemExit("--seeds must be at least 1")
    from cluster.local import CURRENT, embedded_cluster
    from orchestrator.job import run_job
    from trainers.data import load_dataset

    run_name = args.run_name or time.strftime("run-%Y%m%d-%H%M%S")
    base = Path(args.work_dir).resolve() / run_name
    seeds = [args.seed + i for i in range(args.seeds)]
    # every spec is checked before anything runs (the teacher file of jobs 2 and 3 is a path
    # that job 1 writes: their specs parse now, their files are checked when they run)
    job1 = {s: distilled_spec(args, s) for s in seeds}
    specs1 = {s: parse_spec(job1[s], source=f"bench job 1 (seed {s})") for s in seeds}
    placeholder = base / "teacher.safetensors"
    parse_spec(alone_spec(job1[seeds[0]], placeholder), source="bench job 2")
    with_shifted = shifts_images(job1[seeds[0]])
    if with_shifted:
        parse_spec(alone_spec(job1[seeds[0]], placeholder, shifted=True), source="bench job 2b")
    if not args.skip_lenet5:
        parse_spec(lenet5_spec(args, seeds[0], job1[seeds[0]], placeholder), source="bench job 3")
    data = load_dataset(specs1[seeds[0]].data, args.data_dir, seeds[0])

    load = [round(os.getloadavg()[0], 2)]
    started = time.perf_counter()
    per_seed = []
    with embedded_cluster(specs1[seeds[0]]):  # one local Ray cluster for every job
        for i, seed in enumerate(seeds):
            run_dirs = {k: str(base / f"seed-{seed}" / k)
                        for k in ("distilled", "alone", "alone-shifted", "lenet5")}
            walls = {}

            def run(key: str, spec, what: str) -> dict:
                print(f"[bench] seed {seed} ({i + 1}/{len(seeds)}): {what} -> {run_dirs[key]}",
                      flush=True)
                t0 = time.perf_counter()
                report = run_job(spec, data_dir=args.data_dir, run_dir=run_dirs[key],
                                 address=CURRENT)
                walls[key] = round(time.perf_counter() - t0, 1)
                return report

            rounds1 = specs1[seed].pruning.rounds
            distilled = run("distilled", specs1[seed],
                            f"job 1/3 teacher, LeNet-300-100 distilled, {rounds1} pruning rounds, "
                            f"{specs1[seed].quantization.method}")
            teacher_file = Path(run_dirs["distilled"]) / "checkpoints" / "teacher" / "model.safetensors"
            alone = run("alone", parse_spec(alone_spec(job1[seed], teacher_file), source="job 2"),
                        "job 2/3 LeNet-300-100 alone")
            alone_shifted = None
            if with_shifted:
                alone_shifted = run(
                    "alone-shifted",
                    parse_spec(alone_spec(job1[seed], teacher_file, shifted=True), source="job 2b"),
                    "job 2b/3 LeNet-300-100 alone, shifted images")
            files = {"lenet300": file_candidates(distilled, Path(run_dirs["distilled"]), data)}
            lenet5 = None
            if not args.skip_lenet5:
                spec3 = parse_spec(lenet5_spec(args, seed, job1[seed], teacher_file),
                                   source="job 3")
                lenet5 = run("lenet5", spec3, f"job 3/3 LeNet-5 distilled, "
                             f"{spec3.pruning.rounds} pruning rounds")
                files["lenet5"] = file_candidates(lenet5, Path(run_dirs["lenet5"]), data)
            per_seed.append(seed_result(seed, distilled, alone, alone_shifted, lenet5, files,
                                        walls, run_dirs))
    wall = time.perf_counter() - started
    load.append(round(os.getloadavg()[0], 2))

    config = {"options": {k: v for k, v in vars(args).items()
                          if k not in ("data_dir", "work_dir", "json")},
              "lenet300_job": specs1[seeds[0]].model_dump(mode="json")}
    if not args.skip_lenet5:
        config["lenet5_job"] = parse_spec(
            lenet5_spec(args, seeds[0], job1[seeds[0]], placeholder), source="job 3"
        ).model_dump(mode="json")
    result = summarise(per_seed, wall, load, config)
    print("\n" + format_table(result), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"[bench] results written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
