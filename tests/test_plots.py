"""The report's PNG plots and size table, from a synthetic report (no training, no Ray)."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
from matplotlib.image import imread

from orchestrator.plots import (
    DPI,
    FIGSIZE,
    accuracy_vs_size_figure,
    accuracy_vs_sparsity_figure,
    size_table,
    write_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_report() -> dict:
    stage = lambda name, acc, nbytes, params, nonzero, bits, latency: {  # noqa: E731
        "name": name, "accuracy": acc, "file_bytes": nbytes, "params": params,
        "nonzero_params": nonzero, "bits": bits,
        **({"latency_ms": latency} if latency is not None else {})}
    return {
        "name": "digits-demo",
        "teacher": {"accuracy": 0.9812, "params": 1_234_567},
        "dense_student": {"accuracy": 0.9650, "params": 25_000, "nonzero_params": 25_000},
        "rounds": [
            {"round": 1, "target_sparsity": 0.5, "sparsity": 0.5003, "accuracy": 0.9641,
             "nonzero_params": 12_600},
            {"round": 2, "target_sparsity": 0.75, "sparsity": 0.7498, "accuracy": 0.9602,
             "nonzero_params": 6_400},
            {"round": 3, "target_sparsity": 0.9, "sparsity": 0.9001, "accuracy": 0.9410,
             "nonzero_params": 2_600},
        ],
        "stages": [
            stage("teacher", 0.9812, 4_938_268, 1_234_567, 1_234_567, 32,
                  {"batch_1": 1.2345, "batch_256": 20.5}),
            stage("dense student", 0.9650, 102_400, 25_000, 25_000, 32,
                  {"batch_1": 0.12, "batch_256": 1.5}),
            stage("pruned student", 0.9410, 40_960, 25_000, 2_600, 32, None),
            stage("exported int8", 0.9395, 8_192, 25_000, 2_600, 8,
                  {"batch_1": 0.0789, "batch_256": 0.987}),
        ],
    }


def bare_report() -> dict:
    """No pruning rounds and no latency measured anywhere."""
    report = synthetic_report()
    report["rounds"] = []
    for s in report["stages"]:
        s.pop("latency_ms", None)
    return report


def _check_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    width, height = FIGSIZE
    assert img.shape[:2] == (round(height * DPI), round(width * DPI))
    assert img.shape[2] in (3, 4)
    colours = np.unique(img.reshape(-1, img.shape[2]), axis=0)
    assert len(colours) > 10, "the image is (nearly) a single colour"
    # something is drawn across the plot, not just a corner: dark pixels in several places
    dark = img[..., :3].mean(axis=2) < 0.5
    rows, cols = np.nonzero(dark)
    assert np.ptp(rows) > img.shape[0] / 2 and np.ptp(cols) > img.shape[1] / 2


def _annotations(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("make", [synthetic_report, bare_report])
def test_write_plots_writes_two_valid_pngs(tmp_path, make):
    report = make()
    before = copy.deepcopy(report)
    out = tmp_path / "plots" / "nested"  # created if missing
    paths = write_plots(report, out)
    assert set(paths) == {"accuracy_vs_sparsity", "accuracy_vs_size"}
    assert paths["accuracy_vs_sparsity"] == out / "accuracy_vs_sparsity.png"
    assert paths["accuracy_vs_size"] == out / "accuracy_vs_size.png"
    for path in paths.values():
        _check_png(path)
    assert sorted(p.name for p in out.iterdir()) == ["accuracy_vs_size.png", "accuracy_vs_sparsity.png"]
    assert report == before  # the report is not altered
    # the two plots differ
    assert paths["accuracy_vs_sparsity"].read_bytes() != paths["accuracy_vs_size"].read_bytes()


def test_write_plots_does_not_use_pyplot(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    write_plots(synthetic_report(), tmp_path)
    assert matplotlib.get_backend() == backend
    if "matplotlib.pyplot" in sys.modules:  # imported by something else: no figure left open
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []


def test_sparsity_plot_content():
    report = synthetic_report()
    fig = accuracy_vs_sparsity_figure(report)
    (ax,) = fig.axes
    student = [line for line in ax.get_lines() if line.get_label() == "student"]
    assert len(student) == 1
    np.testing.assert_allclose(student[0].get_xdata(), [0.0, 0.5003, 0.7498, 0.9001])
    np.testing.assert_allclose(student[0].get_ydata(), [0.9650, 0.9641, 0.9602, 0.9410])
    teacher = [line for line in ax.get_lines() if line.get_label().startswith("teacher")]
    assert len(teacher) == 1 and teacher[0].get_linestyle() == "--"
    np.testing.assert_allclose(teacher[0].get_ydata(), [0.9812, 0.9812])
    assert "0.9812" in teacher[0].get_label()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["student", teacher[0].get_label()]
    assert _annotations(ax) == ["dense", "round 1", "round 2", "round 3"]
    assert ax.get_xlabel() and ax.get_ylabel() and "digits-demo" in ax.get_title()
    assert ax.xaxis.get_gridlines()[0].get_visible()
    assert tuple(fig.get_size_inches()) == FIGSIZE and fig.dpi == DPI


def test_sparsity_plot_without_rounds():
    fig = accuracy_vs_sparsity_figure(bare_report())
    (ax,) = fig.axes
    student = [line for line in ax.get_lines() if line.get_label() == "student"]
    np.testing.assert_allclose(student[0].get_xdata(), [0.0])
    np.testing.assert_allclose(student[0].get_ydata(), [0.9650])
    assert any(line.get_label().startswith("teacher") for line in ax.get_lines())
    assert _annotations(ax) == ["dense"]


def test_size_plot_content():
    report = synthetic_report()
    fig = accuracy_vs_size_figure(report)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert ax.get_xlabel() == "model file size (bytes)"
    assert ax.get_ylabel() and "digits-demo" in ax.get_title()
    points = np.concatenate([c.get_offsets() for c in ax.collections])
    np.testing.assert_allclose(points, [[s["file_bytes"], s["accuracy"]] for s in report["stages"]])
    assert _annotations(ax) == [
        "teacher\n4822.5 KiB", "dense student\n100.0 KiB", "pruned student\n40.0 KiB",
        "exported int8\n8.0 KiB"]
    lo, hi = ax.get_xlim()
    assert lo < 8_192 and hi > 4_938_268


def _parse(table: str) -> tuple[list[str], list[list[str]]]:
    lines = table.splitlines()
    assert set(lines[1].replace(" ", "")) == {"-"}
    # columns are split on the dashed line's gaps, so names with spaces stay whole
    spans, start = [], 0
    for dashes in lines[1].split("  "):
        spans.append((start, start + len(dashes)))
        start += len(dashes) + 2
    cells = [[line[a:b].strip() for a, b in spans] for line in [lines[0], *lines[2:]]]
    return cells[0], cells[1:]


def test_size_table():
    table = size_table(synthetic_report())
    lines = table.splitlines()
    assert len(lines) == 2 + 4
    assert len({len(line) for line in lines}) == 1  # fixed width
    header, rows = _parse(table)
    assert header == ["stage", "accuracy", "file size (KiB)", "size vs dense", "bits",
                      "nonzero params", "latency b1 ms", "latency b256 ms"]
    assert rows == [
        ["teacher", "0.9812", "4822.5", "0.021x", "32", "1,234,567", "1.23", "20.50"],
        ["dense student", "0.9650", "100.0", "1.0x", "32", "25,000", "0.12", "1.50"],
        ["pruned student", "0.9410", "40.0", "2.5x", "32", "2,600", "-", "-"],
        ["exported int8", "0.9395", "8.0", "12.5x", "8", "2,600", "0.08", "0.99"],
    ]
    # first column left-aligned, the others right-aligned
    assert lines[2].startswith("teacher ")
    assert lines[4].endswith("  -") and lines[5].endswith("0.99")


def test_size_table_without_latency():
    header, rows = _parse(size_table(bare_report()))
    assert len(rows) == 4
    assert all(row[-2:] == ["-", "-"] for row in rows)
    assert [row[3] for row in rows] == ["0.021x", "1.0x", "2.5x", "12.5x"]


def test_size_table_without_dense_stage():
    report = synthetic_report()
    report["stages"] = [s for s in report["stages"] if s["name"] != "dense student"]
    header, rows = _parse(size_table(report))
    assert [row[0] for row in rows] == ["teacher", "pruned student", "exported int8"]
    assert all(row[3] == "-" for row in rows)
