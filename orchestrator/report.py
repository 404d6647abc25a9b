"""The job's report: `report.json` and the table printed at the end of a run."""

from __future__ import annotations


def build_report(
    *, spec_name: str, spec_hash: str, teacher: dict, phases: list[dict], files: dict
) -> dict:
    """Assemble the report from the teacher's figures and each student phase's checkpoint meta.

    `sparsity` is the share of zeros among the prunable weights (the quantity the pruning targets);
    `nonzero_params` / `dense_params` count every parameter of the model, biases included.
    """
    dense = phases[0]
    rounds = [
        {
            "round": p["round"],
            "target_sparsity": p["target_sparsity"],
            "sparsity": p["sparsity"],
            "accuracy": p["accuracy"],
            "nonzero_params": p["nonzero_params"],
            "threshold": p["threshold"],
            "layer_sparsity": p["layer_sparsity"],
            "skipped_nonfinite_steps": p["skipped_nonfinite_steps"],
        }
        for p in phases[1:]
    ]
    last = phases[-1]
    return {
        "name": spec_name,
        "spec_hash": spec_hash,
        "teacher": teacher,
        "dense_student": {
            "accuracy": dense["accuracy"],
            "params": dense["dense_params"],
            "nonzero_params": dense["nonzero_params"],
        },
        "rounds": rounds,
        "final": {
            "accuracy": last["accuracy"],
            "sparsity": last["sparsity"],
            "nonzero_params": last["nonzero_params"],
            "dense_params": last["dense_params"],
            "compression_ratio": last["dense_params"] / max(1, last["nonzero_params"]),
            "layer_sparsity": last["layer_sparsity"],
            "precision": last["precision"],
            "zero_stage": last["zero_stage"],
        },
        "files": files,
    }


def format_table(report: dict) -> str:
    rows = [("model", "accuracy", "sparsity", "nonzero params")]
    t = report["teacher"]
    rows.append(("teacher", f"{t['accuracy']:.4f}", "-", f"{t['params']:,}"))
    d = report["dense_student"]
    rows.append(("dense student", f"{d['accuracy']:.4f}", "0", f"{d['nonzero_params']:,}"))
    for r in report["rounds"]:
        rows.append(
            (f"round {r['round']} (target {r['target_sparsity']:.3f})", f"{r['accuracy']:.4f}",
             f"{r['sparsity']:.4f}", f"{r['nonzero_params']:,}")
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    f = report["final"]
    lines.append("")
    lines.append(
        f"final: accuracy {f['accuracy']:.4f}, sparsity {f['sparsity']:.4f}, "
        f"{f['nonzero_params']:,} of {f['dense_params']:,} weights nonzero "
        f"({f['compression_ratio']:.1f}x fewer)"
    )
    lines.append("per-layer sparsity: " + ", ".join(
        f"{k} {v:.3f}" for k, v in f["layer_sparsity"].items()))
    return "\n".join(lines)
