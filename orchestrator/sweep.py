"""A sweep: one job per point of the spec's grid, then one comparison.

    stillhouse sweep examples/digits-sweep.yaml --run-dir runs/sweep [--address auto]

Points run one after another on one Ray cluster (an embedded one is started once for all of
them), each a full job with its own run dir (so a rerun resumes the sweep point by point). When the grid leaves the teacher alone, the first point trains it and the
others load its weights. The comparison is `sweep.json`, `sweep.md` (a table) and `sweep.png`
(accuracy against sparsity and against nonzero weights), also logged to W&B as a table.

Ray Tune is not used: every point is already a multi-actor job (teacher replicas plus a Ray Train
worker group) that needs the whole of a small cluster, a grid needs no search algorithm or early
stopping, and running points in order is what lets them share the teacher.
"""

from __future__ import annotations

import json
from pathlib import Path

from specs import JobSpec
from specs.job import CheckpointTeacher, TrainedTeacher
from specs.sweep import expand_sweep

TEACHER_KEYS = ("teacher", "data", "seed", "precision")


def _shares_teacher(spec: JobSpec) -> bool:
    if spec.sweep is None or not spec.sweep.share_teacher or not isinstance(spec.teacher, TrainedTeacher):
        return False
    return not any(k.split(".")[0] in TEACHER_KEYS for k in spec.sweep.grid)


def run_sweep(
    spec: JobSpec, *, run_dir: str, data_dir: str | None = None, address: str | None = None,
    trusted_modules: tuple[str, ...] = (), verbose: bool = False,
) -> dict:
    from trainers.tracking import Tracker

    root = Path(run_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    points = expand_sweep(spec)
    if address is None:  # one embedded cluster for every point, not one per point (~6 s each)
        from cluster.local import CURRENT, check_machine, embedded_cluster

        for _, point_spec in points:  # every point fits, before anything starts
            check_machine(point_spec)
        from trainers.models import trusted_modules as trusted_from, trusted_package_dirs

        trusted = trusted_from(trusted_modules)
        py_modules = trusted_package_dirs(trusted) if trusted else []
        with embedded_cluster(max((p for _, p in points), key=lambda p: p.total_cpus),
                              py_modules=py_modules, log_dir=root / "logs", verbose=verbose):
            rows = _run_points(spec, points, root, data_dir, CURRENT, trusted_modules)
    else:
        rows = _run_points(spec, points, root, data_dir, address, trusted_modules)
    share = _shares_teacher(spec)
    keys = list(spec.sweep.grid) if spec.sweep else []
    result = {"name": spec.name, "grid": spec.sweep.grid if spec.sweep else {}, "rows": rows,
              "shared_teacher": share}
    (root / "sweep.json").write_text(json.dumps(result, indent=2))
    table = format_sweep_table(rows, keys)
    (root / "sweep.md").write_text(table + "\n")
    plot_sweep(rows, root / "sweep.png", title=spec.name)
    print(table, flush=True)

    group = spec.wandb.group or spec.name
    tracker = Tracker.start(spec, root, job_type="sweep", name=f"{spec.name}-sweep",
                            config={"grid": result["grid"], "points": len(rows), "group": group})
    columns = ["point", *keys, "accuracy", "sparsity", "nonzero_params", "dense_params"]
    tracker.log_table("sweep/results", columns, [[r[c] for c in columns] for r in rows])
    tracker.log_image("sweep/accuracy_vs_sparsity", root / "sweep.png")
    tracker.finish()
    return result


def _run_points(spec: JobSpec, points: list, root: Path, data_dir: str | None,
                address: str | None, trusted_modules: tuple[str, ...]) -> list[dict]:
    """Run every point's job in turn; the first trains the teacher the others reuse."""
    from orchestrator.job import run_job

    share = _shares_teacher(spec)
    rows = []
    teacher_file = None
    for i, (point, point_spec) in enumerate(points):
        if share and teacher_file is not None:
            point_spec = JobSpec.model_validate({
                **point_spec.model_dump(mode="json"),
                "teacher": CheckpointTeacher(kind="checkpoint", model=spec.teacher.model,
                                             path=str(teacher_file)).model_dump(mode="json"),
            })
        print(f"[sweep] point {i + 1}/{len(points)}: {point}", flush=True)
        point_dir = root / f"point-{i:02d}"
        report = run_job(point_spec, data_dir=data_dir, run_dir=str(point_dir), address=address,
                         trusted_modules=trusted_modules)
        if share and teacher_file is None:
            teacher_file = point_dir / "checkpoints" / "teacher" / "model.safetensors"
        final = report["final"]
        rows.append({
            "point": i, **point, "accuracy": final["accuracy"], "sparsity": final["sparsity"],
            "nonzero_params": final["nonzero_params"], "dense_params": final["dense_params"],
            "dense_student_accuracy": report["dense_student"]["accuracy"],
            "teacher_accuracy": report["teacher"]["accuracy"], "run_dir": str(point_dir),
        })
    return rows


def format_sweep_table(rows: list[dict], keys: list[str]) -> str:
    header = ["point", *keys, "accuracy", "sparsity", "nonzero params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [str(r["point"]), *(str(r[k]) for k in keys), f"{r['accuracy']:.4f}",
                 f"{r['sparsity']:.4f}", f"{r['nonzero_params']:,}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ordered = sorted(rows, key=lambda r: r["sparsity"])
    left.plot([r["sparsity"] for r in ordered], [r["accuracy"] for r in ordered], "o-")
    left.axhline(rows[0]["dense_student_accuracy"], ls="--", c="gray", label="dense student")
    left.axhline(rows[0]["teacher_accuracy"], ls=":", c="black", label="teacher")
    left.set_xlabel("global sparsity of prunable weights")
    left.set_ylabel("test accuracy")
    left.legend()
    right.plot([r["nonzero_params"] for r in ordered], [r["accuracy"] for r in ordered], "o-")
    right.set_xscale("log")
    right.set_xlabel("nonzero parameters")
    right.set_ylabel("test accuracy")
    fig.suptitle(f"{title}: accuracy against sparsity and size")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
