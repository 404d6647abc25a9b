"""The job's last stage: quantize the final student, write the compact file, measure everything.

Runs in the driver (or in `stillhouse export RUN_DIR`) from committed checkpoints only, so it can
be re-run on a finished run dir without training anything:

    1. the final phase's fp32 weights and masks; structured pruning cuts dead channels out
    2. post-training quantization (dynamic / static) or the weights QAT / binarization / weight
       sharing trained
    3. `student.compressed.safetensors` (trainers/export.py), then reloaded from disk and checked
       to predict exactly what the in-memory model predicts; and `student.compressed.pt2`, a
       `torch.export` program of the same weights (in fp32, batch size dynamic) that loads with
       torch alone, checked the same way
    4. accuracy, file size and CPU latency (batch 1 and 256) of teacher, dense student, pruned
       student and each compression stage, side by side
"""

from __future__ import annotations

from pathlib import Path

import torch

from specs import JobSpec, spec_hash
from specs.errors import InputError, JobError

COMPRESSED_FILE = "student.compressed.safetensors"
EXPORTED_PROGRAM = "student.compressed.pt2"


class ExportError(JobError):
    """The compressed model does not reload to the same predictions."""


class NotARunDirError(InputError):
    """`stillhouse export` was given a folder that holds no finished run."""


def compress_and_export(
    spec: JobSpec, data, run_path: Path, teacher: dict, teacher_model: torch.nn.Module | None,
    trusted: frozenset[str] = frozenset(),
) -> dict:
    """Returns the report's `stages` and `export` sections. `data` is an in-memory Dataset or a
    streamed source's prepared copy: both give test batches and calibration images."""
    from safetensors.torch import load_file, save

    from trainers import checkpoint
    from trainers.codec import BITS
    from trainers.export import (
        export_program, latency_ms, load_compressed, load_program, predictions, write_compressed,
    )
    from trainers.models import architecture, build_from_architecture, count_params
    from trainers.plan import student_phases
    from trainers.quantize import (
        calibrate_static, dynamic_int8, layer_kinds, quantize_state, static_int8, weight_kinds,
    )
    from trainers.structured import shrink

    root = run_path / "checkpoints"
    phases = student_phases(spec)
    for p in phases:  # a damaged or half-written checkpoint stops here, named
        checkpoint.verify(root / p.name)
    full_arch = architecture(spec.student.model, data.image_shape, data.num_classes)
    structured = spec.pruning.enabled and spec.pruning.granularity == "channel"

    def phase_state(name: str) -> tuple[dict, dict, dict]:
        """(architecture, fp32 state, masks) after a phase; structured pruning's dead channels
        are cut out, and what is left is dense."""
        state = load_file(str(root / name / "model.safetensors"))
        masks = {k: v.bool() for k, v in load_file(str(root / name / "masks.safetensors")).items()}
        if structured:  # the export records the smaller modules' shapes beside the full ones
            small, shapes = shrink(model_of(full_arch, state), masks,
                                   torch.zeros(2, *data.image_shape))
            return {**full_arch, "module_shapes": shapes}, small.state_dict(), {}
        return full_arch, state, masks

    def model_of(arch_, state_):
        m = build_from_architecture(arch_, trusted)
        m.load_state_dict(state_)
        return m.eval()

    def accuracy(model) -> tuple[float, torch.Tensor]:
        """(test accuracy, predicted classes) over the whole test set."""
        pred, labels = predictions(model, data.test_batches())
        return float((pred == labels).float().mean()), pred

    method = spec.quantization.method
    lat = spec.export
    image_shape = tuple(data.image_shape)

    def timings(model) -> dict:
        return {f"batch_{b}": latency_ms(model, image_shape, b, threads=lat.latency_threads)
                for b in lat.latency_batches}

    dense_dir = root / phases[0].name
    dense_model = model_of(full_arch, load_file(str(dense_dir / "model.safetensors")))
    dense_bytes = (dense_dir / "model.safetensors").stat().st_size
    stages = [
        {"name": "teacher", "accuracy": teacher["accuracy"], "file_bytes": teacher.get("file_bytes"),
         "params": teacher["params"], "nonzero_params": teacher["params"], "bits": 32,
         **({"latency_ms": timings(teacher_model)} if teacher_model is not None else {})},
        {"name": "dense student", "accuracy": accuracy(dense_model)[0],
         "file_bytes": dense_bytes, "params": count_params(dense_model),
         "nonzero_params": count_params(dense_model), "bits": 32, "latency_ms": timings(dense_model)},
    ]
    # the student as pruning left it: before any quantized fine-tuning
    trained_quantized = spec.quantization.trains
    before_q = phases[-2] if trained_quantized else phases[-1]
    arch, pruned_state, pruned_masks = phase_state(before_q.name)
    pruned_model = model_of(arch, pruned_state)
    if spec.pruning.enabled:
        stages.append({
            "name": "pruned (channels removed)" if structured else "pruned (fp32, zeros stored)",
            "accuracy": accuracy(pruned_model)[0],
            "file_bytes": len(save({k: v.contiguous() for k, v in pruned_state.items()})),
            "params": count_params(pruned_model),
            "nonzero_params": _nonzero(pruned_state), "bits": 32,
            "latency_ms": timings(pruned_model),
        })

    kinds = layer_kinds(pruned_model, method, spec.quantization.bits)
    calibration = torch.from_numpy(data.calibration(spec.quantization.calibration_samples)).float()
    if trained_quantized:
        # QAT is compared with both post-training int8 methods, binary / ternary with the same
        # codes applied without fine-tuning, weight sharing with k-means' shared values
        for ptq_method in (("dynamic", "static") if method == "qat" else (method,)):
            ptq_kinds = layer_kinds(pruned_model, ptq_method, spec.quantization.bits)
            ptq_float = model_of(arch, quantize_state(pruned_state, ptq_kinds, pruned_masks))
            if ptq_method == "static":
                ptq = static_int8(ptq_float, calibrate_static(ptq_float, calibration), image_shape)
            elif ptq_method == "kmeans":
                ptq = ptq_float  # shared values run as fp32 weights
            else:
                ptq = dynamic_int8(ptq_float)
            label = {"dynamic": "int8 dynamic", "static": "int8 static"}.get(ptq_method, ptq_method)
            stages.append({
                "name": f"post-training {label} (no fine-tuning)",
                "accuracy": accuracy(ptq)[0], "file_bytes": None,
                "params": count_params(pruned_model), "nonzero_params": _nonzero(pruned_state),
                "bits": _bits(ptq_kinds, pruned_state, pruned_masks),
            })

    # the weights to export: after the quantized fine-tuning, or the pruned ones read above
    arch, state, masks = (phase_state(phases[-1].name) if trained_quantized
                          else (arch, pruned_state, pruned_masks))
    q_state = quantize_state(state, kinds, masks)
    q_float = model_of(arch, q_state)
    ranges = None
    if method == "static":
        ranges = calibrate_static(q_float, calibration)
        runtime, compressed = "int8_static", static_int8(q_float, ranges, image_shape)
    elif method in ("none", "kmeans"):  # shared values: fp32 weights from the codebooks
        runtime, compressed = "fp32", q_float
    else:
        runtime, compressed = "int8_dynamic", dynamic_int8(q_float)
    acc, pred = accuracy(compressed)
    bits = _bits(kinds, q_state, masks)
    prunable = [n for n in q_state if n.endswith(".weight")]
    sparsity = 1.0 - sum(int(torch.count_nonzero(q_state[n])) for n in prunable) / max(
        1, sum(q_state[n].numel() for n in prunable))
    manifest = {
        "method": {"pruning": (spec.pruning.granularity if spec.pruning.enabled else "none"),
                   "quantization": method},
        "sparsity": sparsity, "bits": bits, "accuracy": acc,
        "params": count_params(q_float), "nonzero_params": _nonzero(q_state),
        "dense_params": count_params(dense_model), "spec_hash": spec_hash(spec), "name": spec.name,
    }
    if method == "kmeans":  # the code width of each layer; `bits` is their mean per kept weight
        manifest["layer_bits"] = {n: BITS[k] for n, k in weight_kinds(kinds).items()}
    path = run_path / COMPRESSED_FILE
    layout = write_compressed(path, arch=arch, state=q_state, masks=masks,
                              kinds=weight_kinds(kinds), runtime=runtime, manifest=manifest,
                              act_ranges=ranges, entropy_coding=spec.export.entropy_coding)
    reloaded, _ = load_compressed(path, trusted)
    reload_acc, reload_pred = accuracy(reloaded)
    reload_matches = torch.equal(pred, reload_pred)
    if not reload_matches:
        raise ExportError(
            f"{path} reloads to different predictions on {int((pred != reload_pred).sum())} of "
            f"{len(pred)} test images"
        )
    # the same weights as a torch.export program: fp32 kernels, loads with torch alone
    program_path = run_path / EXPORTED_PROGRAM
    export_program(q_float, image_shape, program_path)
    float_pred = accuracy(q_float)[1]
    program_pred = accuracy(load_program(program_path))[1]
    if not torch.equal(float_pred, program_pred):
        raise ExportError(
            f"{program_path} predicts differently from the model it was exported from on "
            f"{int((float_pred != program_pred).sum())} of {len(float_pred)} test images"
        )
    compressed_bytes = path.stat().st_size
    exported = {
        "name": f"compressed ({_label(spec)})", "accuracy": reload_acc,
        "file_bytes": compressed_bytes, "params": manifest["params"],
        "nonzero_params": manifest["nonzero_params"], "bits": bits,
        "latency_ms": timings(reloaded),
    }
    stages.append(exported)
    export = {
        "file": COMPRESSED_FILE, "runtime": runtime, **manifest,
        "dense_file_bytes": dense_bytes, "compressed_file_bytes": compressed_bytes,
        "size_reduction": dense_bytes / compressed_bytes,
        "reload_matches": reload_matches, "latency_ms": exported["latency_ms"],
        "tensor_bytes": {n: info["stored_bytes"] for n, info in layout.items()},
        "entropy_coding": spec.export.entropy_coding, "architecture": arch,
        "program": EXPORTED_PROGRAM, "program_bytes": program_path.stat().st_size,
    }
    return {"stages": stages, "export": export}


def _nonzero(state: dict[str, torch.Tensor]) -> int:
    return sum(int(torch.count_nonzero(v)) for v in state.values())


def _bits(kinds: dict[str, str], state: dict[str, torch.Tensor],
          masks: dict[str, torch.Tensor]) -> int | float:
    """Bits per stored weight: for weight sharing the layers' code widths averaged over their
    kept weights (two decimals); otherwise the method's kind's (32 when nothing is quantized)."""
    from trainers.codec import BITS, SHARED
    from trainers.quantize import weight_kinds

    shared = {n: k for n, k in weight_kinds(kinds).items() if k in SHARED}
    if not shared:
        return BITS[_main_kind(kinds)] if kinds else 32
    kept = {n: int(masks[n].sum()) if n in masks else state[n].numel() for n in shared}
    mean = sum(BITS[k] * kept[n] for n, k in shared.items()) / max(1, sum(kept.values()))
    return int(mean) if mean == int(mean) else round(mean, 2)


def _main_kind(kinds: dict[str, str]) -> str:
    """The method's kind (binary / ternary networks keep their first and last layers at int8)."""
    values = set(kinds.values())
    return next((k for k in ("binary", "ternary") if k in values), "int8")


def _label(spec: JobSpec) -> str:
    parts = []
    if spec.pruning.enabled:
        parts.append(f"{spec.pruning.target_sparsity:.0%} {spec.pruning.granularity} pruned")
    if spec.quantization.method == "kmeans":
        parts.append("kmeans, fp32 runtime")
    elif spec.quantization.method != "none":
        parts.append(spec.quantization.method)
    return ", ".join(parts) or "fp32"


def export_run_dir(run_dir: Path, data_dir: str | None = None,
                   trusted: frozenset[str] = frozenset()) -> dict:
    """`stillhouse export RUN_DIR`: redo the last stage of a finished run; updates report.json.

    The data comes from where the run recorded it (`data.json`: the data dir, or a streamed
    source's prepared copy); a `data_dir` given here wins."""
    import json

    from orchestrator.report import publish_report
    from specs import load_spec
    from specs.job import TrainedTeacher
    from trainers.teacher_server import load_teacher

    run_dir = Path(run_dir)
    report_path = run_dir / "report.json"
    if not (run_dir / "spec.yaml").is_file() or not report_path.is_file():
        raise NotARunDirError(f"{run_dir} is not a finished run dir (no spec.yaml or report.json)")
    spec = load_spec(run_dir / "spec.yaml")
    report = json.loads(report_path.read_text())
    if spec.language_model:  # Hugging Face directories from the checkpoints and the token blocks
        from trainers.lm_export import export_language_model
        from trainers.lm_job import TEXT_DATA
        from trainers.text_data import TextDataset

        data = TextDataset.open(run_dir / TEXT_DATA)
        report.update(export_language_model(spec, data, run_dir, report["teacher"]))
        _write_report(report_path, report)
        publish_report(report, run_dir)
        return report
    data = recorded_data(run_dir, spec, data_dir)
    if isinstance(spec.teacher, TrainedTeacher):
        blob = (run_dir / "checkpoints" / "teacher" / "model.safetensors").read_bytes()
    else:
        blob = Path(spec.teacher.path).read_bytes()
    teacher_model = load_teacher(spec.teacher, blob, data.image_shape, data.num_classes, trusted)
    teacher = {**report["teacher"], "file_bytes": len(blob)}
    report.update(compress_and_export(spec, data, run_dir, teacher, teacher_model, trusted))
    report.setdefault("files", {})["compressed"] = COMPRESSED_FILE
    report["files"]["exported_program"] = EXPORTED_PROGRAM
    _write_report(report_path, report)
    publish_report(report, run_dir)
    return report


def _write_report(path: Path, report: dict) -> None:
    import json

    tmp = path.with_name("report.json.partial")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)


def recorded_data(run_dir: Path, spec: JobSpec, data_dir: str | None):
    """The data a finished run used, from its `data.json`."""
    import json

    from trainers.data import DataError, load_dataset

    record = run_dir / "data.json"
    recorded = json.loads(record.read_text()) if record.is_file() else {}
    if recorded.get("prepared"):
        from trainers.image_sources import MANIFEST, StreamedData

        folder = Path(recorded["prepared"])
        if not (folder / MANIFEST).is_file():
            raise DataError(f"the prepared copy of the data, {folder}, is gone: run the job "
                            "again to prepare it")
        return StreamedData.open(folder)
    return load_dataset(spec.data, data_dir or recorded.get("data_dir"), spec.seed)
