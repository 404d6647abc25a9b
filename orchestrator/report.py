"""The job's report: `report.json` and the table printed at the end of a run."""

from __future__ import annotations


def student_report(spec_name: str, spec_hash: str, teacher: dict, run_path, names: list[str]
                   ) -> tuple[list[dict], dict]:
    """After the student stage: every phase's checkpoint verified (its meta), the last phase's
    weights and masks copied to the run dir as the student's files, and the report built."""
    import shutil
    from pathlib import Path

    from trainers import checkpoint

    ckpt_root = Path(run_path) / "checkpoints"
    metas = [checkpoint.verify(ckpt_root / n) for n in names]
    last = ckpt_root / names[-1]
    shutil.copyfile(last / "model.safetensors", Path(run_path) / "student.safetensors")
    shutil.copyfile(last / "masks.safetensors", Path(run_path) / "student-masks.safetensors")
    report = build_report(
        spec_name=spec_name, spec_hash=spec_hash, teacher=teacher, phases=metas,
        files={"student": "student.safetensors", "masks": "student-masks.safetensors"},
    )
    return metas, report


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
        if p["kind"] == "prune"
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


def language_model_report(report: dict, phases: list[dict]) -> dict:
    """Add a language-model job's figures to a report `build_report` made (in place): the task,
    and for the dense student, each round and the final student the test perplexity and the
    tokens trained per second (`accuracy` is the next-token accuracy there)."""
    report["task"] = "causal_lm"
    dense, last = phases[0], phases[-1]
    report["dense_student"].update(perplexity=dense["perplexity"],
                                   tokens_per_s=dense["tokens_per_s"])
    prune_phases = [p for p in phases[1:] if p["kind"] == "prune"]
    for row, phase in zip(report["rounds"], prune_phases):
        row.update(perplexity=phase["perplexity"], tokens_per_s=phase["tokens_per_s"])
    report["final"]["perplexity"] = last["perplexity"]
    report["tokens_per_s"] = dense["tokens_per_s"]  # distillation throughput, all workers
    return report


def publish_report(report: dict, run_path, tracker=None) -> dict:
    """Write the plots next to report.json and send them, and the size table, to W&B."""
    from pathlib import Path

    from orchestrator.plots import write_plots

    plots = write_plots(report, Path(run_path) / "plots")
    if tracker is not None:
        tracker.log_images({f"report/{key}": path for key, path in plots.items()})
        columns = ["stage", "accuracy", "file_bytes", "params", "nonzero_params", "bits",
                   "latency_b1_ms", "latency_b256_ms"]
        rows = [[s["name"], s["accuracy"], s.get("file_bytes"), s.get("params"),
                 s.get("nonzero_params"), s.get("bits"),
                 (s.get("latency_ms") or {}).get("batch_1"),
                 (s.get("latency_ms") or {}).get("batch_256")]
                for s in report.get("stages", [])]
        tracker.log_table("report/stages", columns, rows)
    return plots


def format_table(report: dict) -> str:
    if report.get("task") == "causal_lm":
        return format_language_model_table(report)
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
    layers = f["layer_sparsity"]
    if len(layers) <= 12:
        lines.append("per-layer sparsity: " + ", ".join(f"{k} {v:.3f}" for k, v in layers.items()))
    else:  # a deep model: the spread, not a wall of names (report.json has every layer)
        values = sorted(layers.values())
        lines.append(f"per-layer sparsity over {len(values)} tensors: min {values[0]:.3f}, "
                     f"median {values[len(values) // 2]:.3f}, max {values[-1]:.3f}")
    if report.get("stages"):
        from orchestrator.plots import size_table

        e = report["export"]
        lines += ["", size_table(report), "",
                  f"exported {e['file']}: {e['compressed_file_bytes']:,} bytes, "
                  f"{e['size_reduction']:.1f}x smaller than the dense fp32 student's "
                  f"{e['dense_file_bytes']:,}; accuracy {e['accuracy']:.4f}"]
    return "\n".join(lines)


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def format_language_model_table(report: dict) -> str:
    """A language-model job's tables: perplexity and next-token accuracy of the teacher, the
    dense student and each round, then the exported directories."""
    rows = [("model", "perplexity", "next-token acc", "sparsity", "nonzero params", "tokens/s")]
    t = report["teacher"]
    rows.append(("teacher", f"{t['perplexity']:.3f}", f"{t['accuracy']:.4f}", "-",
                 f"{t['params']:,}", "-"))
    d = report["dense_student"]
    rows.append(("dense student", f"{d['perplexity']:.3f}", f"{d['accuracy']:.4f}", "0",
                 f"{d['nonzero_params']:,}", f"{d['tokens_per_s']:,.0f}"))
    for r in report["rounds"]:
        rows.append((f"round {r['round']} (target {r['target_sparsity']:.3f})",
                     f"{r['perplexity']:.3f}", f"{r['accuracy']:.4f}", f"{r['sparsity']:.4f}",
                     f"{r['nonzero_params']:,}", f"{r['tokens_per_s']:,.0f}"))
    lines = _columns(rows)
    cache = report.get("token_cache")
    if cache:
        lines += ["", f"token cache: top-{cache['k']} of {cache['positions']:,} positions, "
                  f"{cache['bytes_per_token']} bytes per token ({cache['file_bytes']:,} bytes "
                  f"on disk)"]
    if report.get("stages"):
        rows = [("stage", "perplexity", "next-token acc", "size (KiB)", "bits", "nonzero params")]
        for s in report["stages"]:
            size = s.get("file_bytes")
            rows.append((s["name"], f"{s['perplexity']:.3f}", f"{s['accuracy']:.4f}",
                         f"{size / 1024:.1f}" if size else "-", str(s.get("bits", "-")),
                         f"{s['nonzero_params']:,}" if s.get("nonzero_params") is not None
                         else "-"))
        e = report["export"]
        lines += ["", *_columns(rows), "",
                  f"exported {e['dir']}/: logits within {e['logit_max_abs_diff']:.2g} of the "
                  f"student's (tolerance {e['logit_tolerance']:g})"]
        if "int8" in e:
            q = e["int8"]
            lines.append(f"exported {q['dir']}/: logits within {q['logit_max_abs_diff']:.2g} of "
                         f"the in-memory int8 model's (tolerance {q['logit_tolerance']:.2g})")
    return "\n".join(lines)
