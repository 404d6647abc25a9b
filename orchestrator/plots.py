"""The report's plots (`accuracy_vs_sparsity.png`, `accuracy_vs_size.png`) and its size table.

The figures are drawn with matplotlib's Agg canvas directly (no pyplot), so importing this module
selects no backend for anyone else and keeps no figure alive after it is written.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

FIGSIZE = (6.0, 4.5)
DPI = 120


def _figure() -> tuple[Figure, Axes]:
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: Path) -> None:
    try:
        fig.savefig(path, dpi=DPI)
    finally:
        fig.clear()  # drop the artists now rather than whenever the figure is collected


def _title(report: dict, what: str) -> str:
    name = report.get("name")
    return f"{name}: {what}" if name else what


def accuracy_vs_sparsity_figure(report: dict) -> Figure:
    """Accuracy against sparsity: the dense student at 0, then each pruning round in order."""
    dense = report["dense_student"]
    rounds = sorted(report.get("rounds") or [], key=lambda r: r["round"])
    xs = [0.0] + [r["sparsity"] for r in rounds]
    ys = [dense["accuracy"]] + [r["accuracy"] for r in rounds]
    labels = ["dense"] + [f"round {r['round']}" for r in rounds]

    fig, ax = _figure()
    ax.plot(xs, ys, "o-", color="tab:blue", label="student")
    for x, y, label in zip(xs, ys, labels):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 6), fontsize=8)
    teacher = report["teacher"]["accuracy"]
    ax.axhline(teacher, ls="--", color="gray", label=f"teacher ({teacher:.4f})")
    ax.set_xlabel("sparsity of prunable weights")
    ax.set_ylabel("test accuracy")
    ax.set_title(_title(report, "accuracy against sparsity"))
    ax.set_xlim(left=-0.05, right=max(1.05, max(xs) + 0.1))
    ax.margins(y=0.12)  # headroom for the labels above the points
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_vs_size_figure(report: dict) -> Figure:
    """Accuracy against model file size (log scale), one annotated point per stage.

    A stage without a positive `file_bytes` cannot sit on a log axis and is left out.
    """
    stages = [s for s in report.get("stages") or [] if (s.get("file_bytes") or 0) > 0]
    fig, ax = _figure()
    for s in stages:
        ax.scatter([s["file_bytes"]], [s["accuracy"]], s=30, zorder=3)
        ax.annotate(f"{s['name']}\n{s['file_bytes'] / 1024:.1f} KiB", (s["file_bytes"], s["accuracy"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    if stages:
        lo = min(s["file_bytes"] for s in stages)
        hi = max(s["file_bytes"] for s in stages)
        ax.set_xlim(lo / 2, hi * 4)  # room on the right for the annotations
    ax.margins(y=0.12)  # and above the highest point
    ax.set_xlabel("model file size (bytes)")
    ax.set_ylabel("test accuracy")
    ax.set_title(_title(report, "accuracy against model size"))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(report: dict, out_dir: Path) -> dict[str, Path]:
    """Write accuracy_vs_sparsity.png and accuracy_vs_size.png into out_dir; return
    {"accuracy_vs_sparsity": path, "accuracy_vs_size": path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "accuracy_vs_sparsity": out_dir / "accuracy_vs_sparsity.png",
        "accuracy_vs_size": out_dir / "accuracy_vs_size.png",
    }
    _save(accuracy_vs_sparsity_figure(report), paths["accuracy_vs_sparsity"])
    _save(accuracy_vs_size_figure(report), paths["accuracy_vs_size"])
    return paths


def _ratio(r: float) -> str:
    # one decimal as usual; three below 1 (a larger model, the teacher) so it does not read "0.0x"
    return f"{r:.1f}x" if r >= 0.95 else f"{r:.3f}x"


def size_table(report: dict) -> str:
    """A fixed-width table of `report["stages"]`: accuracy, file size, bits, nonzero params,
    latency ("-" where a figure is missing) and "size vs dense", the dense student's file size
    divided by the stage's ("12.3x" is 12.3 times smaller than the dense student; the teacher,
    larger, reads below 1x, to three decimals; "-" without a "dense student" stage)."""
    stages = report.get("stages") or []
    dense_bytes = next((s["file_bytes"] for s in stages if s["name"] == "dense student"), None)
    rows = [("stage", "accuracy", "file size (KiB)", "size vs dense", "bits", "nonzero params",
             "latency b1 ms", "latency b256 ms")]
    for s in stages:
        latency = s.get("latency_ms") or {}
        b1, b256 = latency.get("batch_1"), latency.get("batch_256")
        size = s.get("file_bytes")  # None for a stage that was measured but not written out
        ratio = _ratio(dense_bytes / size) if dense_bytes and size else "-"
        rows.append((
            s["name"],
            f"{s['accuracy']:.4f}",
            f"{size / 1024:.1f}" if size else "-",
            ratio,
            str(s["bits"]) if s.get("bits") is not None else "-",
            f"{s['nonzero_params']:,}" if s.get("nonzero_params") is not None else "-",
            f"{b1:.2f}" if b1 is not None else "-",
            f"{b256:.2f}" if b256 is not None else "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
