"""The last stage of a language-model job: the final student as Hugging Face directories, loaded
back and checked, and the figures of every stage.

    export = export_language_model(spec, data, run_dir, teacher)   # {"stages": [...], "export": {...}}

From the committed checkpoints only (so `stillhouse export RUN_DIR` redoes it):

    1. the final phase's fp32 weights into the student's architecture; every pruned weight must
       be exactly zero; under structured pruning (`granularity: channel`) the pruned MLP neurons
       and attention groups are cut out (a smaller config), and the smaller model must compute
       the masked one's logits;
    2. `student-hf/`: config.json, model.safetensors and the tokenizer, loaded back with
       transformers' `from_pretrained` (offline, safetensors only); its logits on the test
       blocks must be those of the in-memory student (FP32_TOLERANCE);
    3. with `quantization.method: int8_weights`, `student-int8/`: int8 weights per output channel
       in the compressed-tensors format (what vLLM loads), loaded back by transformers through
       compressed-tensors; its logits must be those of the in-memory quantized model
       (INT8_TOLERANCE);
    4. perplexity and next-token accuracy on the test blocks, file bytes and parameters of the
       teacher, the dense student, the pruned student and each exported directory.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from specs.errors import JobError
from specs.job import JobSpec
from trainers.lm_teacher import perplexity, token_scores
from trainers.text_data import TextDataset

STUDENT_DIR = "student-hf"
INT8_DIR = "student-int8"
# Both sides hold the same fp32 weights and run the same model class: the logits match bit for
# bit in practice; the tolerance only allows for another summation order in another process.
FP32_TOLERANCE = 1e-5
# Both sides compute with the same int8 codes times the same float32 scales (in memory
# compressed-tensors quantize-dequantizes on the fly; the loaded model was decompressed by
# compressed-tensors), so only float32 rounding can separate them. Relative to the largest
# |logit| (a trained model's logits reach tens).
INT8_TOLERANCE = 1e-5
EVAL_BATCH = 16


class LMExportError(JobError):
    """An exported directory does not load back to the model it was written from."""


def _scores(model: nn.Module, data: TextDataset) -> tuple[float, float]:
    total = np.zeros(3, dtype=np.float64)
    for ids, mask in data.test_batches(EVAL_BATCH):
        total += token_scores(model, torch.from_numpy(ids), torch.from_numpy(mask))
    return perplexity(total)


@torch.no_grad()
def _logits(model: nn.Module, data: TextDataset, rows: int = 8) -> torch.Tensor:
    """(rows, L, V) float32 logits of the first test blocks."""
    ids, mask = next(data.test_batches(rows))
    return model(input_ids=torch.from_numpy(ids),
                 attention_mask=torch.from_numpy(mask)).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _dir_bytes(folder: Path) -> int:
    """Bytes of a model directory's weights (its safetensors files)."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def _count(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters), each tensor once (tied weights once)."""
    params = list(model.parameters())  # deduplicated by torch
    return (sum(p.numel() for p in params),
            sum(int(torch.count_nonzero(p)) for p in params))


CONFIG_COUNTS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "n_inner",
                 "n_head")


def _shrunk(student: nn.Module, masks: dict[str, torch.Tensor], reference: torch.Tensor,
            data: TextDataset, phase: str) -> tuple[nn.Module, torch.Tensor, dict]:
    """Structured pruning: the student without its pruned neurons and attention groups (a new
    config), checked to compute what the masked one does. The pruned units add exact zeros to
    the masked model's sums; the smaller one leaves them out, so only the order of float32 sums
    can differ (FP32_TOLERANCE relative to the largest |logit|)."""
    from trainers.lm_pruning import plan_from_masks, shrink

    try:  # whole units, as many in every block
        small = shrink(student, plan_from_masks(student, masks))
    except ValueError as err:
        raise LMExportError(f"{phase}: the masks do not remove whole units: {err}") from None
    logits = _logits(small, data)
    diff = _max_diff(logits, reference)
    bound = FP32_TOLERANCE * max(1.0, float(reference.abs().max()))
    if diff > bound:
        raise LMExportError(f"{phase}: the shrunk student's logits are {diff:.3g} away from the "
                            f"masked one's (tolerance {bound:.3g})")

    def counts(config) -> dict:
        return {k: getattr(config, k) for k in CONFIG_COUNTS if getattr(config, k, None)}

    return small, logits, {"config_before": counts(student.config),
                           "config_after": counts(small.config),
                           "logit_max_abs_diff": diff, "logit_tolerance": bound}


def export_language_model(spec: JobSpec, data: TextDataset, run_path: Path,
                          teacher: dict) -> dict:
    """Returns the report's `stages` and `export` sections (see the module docstring); raises
    LMExportError when a directory does not load back to its model."""
    from safetensors.torch import load_file

    from trainers import checkpoint
    from trainers.hf_models import (
        build_hf_model, load_hf_dir, quantize_int8_, save_hf_dir, save_int8_dir,
    )
    from trainers.lm_job import fresh, load_weights_
    from trainers.plan import student_phases

    root = run_path / "checkpoints"
    phases = student_phases(spec)
    for p in phases:  # a damaged or half-written checkpoint stops here, named
        checkpoint.verify(root / p.name)

    def phase_model(name: str) -> nn.Module:
        state = load_file(str(root / name / "model.safetensors"))
        return load_weights_(build_hf_model(fresh(spec.student.model)), state)

    stages = [{"name": "teacher", **{k: teacher[k] for k in ("perplexity", "accuracy", "params",
                                                             "file_bytes") if k in teacher},
               "nonzero_params": teacher.get("params"), "bits": 32}]
    dense = phase_model(phases[0].name)
    ppl, acc = _scores(dense, data)
    params, _ = _count(dense)
    stages.append({"name": "dense student", "perplexity": ppl, "accuracy": acc,
                   "file_bytes": (root / phases[0].name / "model.safetensors").stat().st_size,
                   "params": params, "nonzero_params": params, "bits": 32})
    del dense

    final_name = phases[-1].name
    student = phase_model(final_name)
    masks = load_file(str(root / final_name / "masks.safetensors"))
    params_by_name = dict(student.named_parameters())
    pruned = 0
    for name, mask in masks.items():
        kept = mask.bool()
        live = int(torch.count_nonzero(params_by_name[name].detach()[~kept]))
        if live:
            raise LMExportError(f"{final_name}: {live} pruned weights of {name} are not zero")
        pruned += int((~kept).sum())
    params, nonzero = _count(student)
    reference = _logits(student, data)
    if spec.pruning.enabled:
        ppl, acc = _scores(student, data)
        stages.append({"name": "pruned (fp32, zeros stored)", "perplexity": ppl, "accuracy": acc,
                       "file_bytes": None, "params": params, "nonzero_params": nonzero,
                       "bits": 32})
    structure = None
    if spec.pruning.enabled and spec.pruning.granularity == "channel":
        student, reference, structure = _shrunk(student, masks, reference, data, final_name)
        params, nonzero = _count(student)

    out = save_hf_dir(student, run_path / STUDENT_DIR, tokenizer=data.tokenizer_dir)
    loaded = load_hf_dir(out)  # transformers' from_pretrained, offline, safetensors only
    diff = _max_diff(_logits(loaded, data), reference)
    if diff > FP32_TOLERANCE:
        raise LMExportError(f"{out} loads back with logits {diff:.3g} away from the student's "
                            f"(tolerance {FP32_TOLERANCE:g})")
    loaded_params, loaded_nonzero = _count(loaded)
    if loaded_nonzero != nonzero:
        raise LMExportError(f"{out} holds {loaded_nonzero:,} nonzero weights, the student "
                            f"{nonzero:,}")
    ppl, acc = _scores(loaded, data)
    hf_stage = {"name": "exported (Hugging Face, fp32)", "perplexity": ppl, "accuracy": acc,
                "file_bytes": _dir_bytes(out), "params": loaded_params,
                "nonzero_params": loaded_nonzero, "bits": 32}
    stages.append(hf_stage)
    export = {"dir": STUDENT_DIR, "file_bytes": hf_stage["file_bytes"],
              "logit_max_abs_diff": diff, "logit_tolerance": FP32_TOLERANCE,
              "perplexity": ppl, "accuracy": acc, "params": loaded_params,
              "nonzero_params": loaded_nonzero, "pruned_weights": pruned,
              "sparsity": pruned / max(1, sum(m.numel() for m in masks.values())) if masks else 0.0,
              "dense_file_bytes": stages[1]["file_bytes"], "quantization": spec.quantization.method}
    if structure is not None:
        export["structured"] = structure
    del loaded

    if spec.quantization.method == "int8_weights":
        quantized = copy.deepcopy(student)
        quantize_int8_(quantized)
        q_reference = _logits(quantized, data)
        q_ppl, q_acc = _scores(quantized, data)
        out8 = save_int8_dir(quantized, run_path / INT8_DIR, tokenizer=data.tokenizer_dir)
        again = load_hf_dir(out8)  # decompressed by compressed-tensors inside transformers
        diff8 = _max_diff(_logits(again, data), q_reference)
        bound = INT8_TOLERANCE * max(1.0, float(q_reference.abs().max()))
        if diff8 > bound:
            raise LMExportError(f"{out8} loads back with logits {diff8:.3g} away from the "
                                f"in-memory int8 model's (tolerance {bound:.3g})")
        ppl8, acc8 = _scores(again, data)
        int8_stage = {"name": "exported (int8 weights, compressed-tensors)",
                      "perplexity": ppl8, "accuracy": acc8, "file_bytes": _dir_bytes(out8),
                      "params": loaded_params, "nonzero_params": loaded_nonzero, "bits": 8}
        stages.append(int8_stage)
        export["int8"] = {
            "dir": INT8_DIR, "file_bytes": int8_stage["file_bytes"], "perplexity": ppl8,
            "accuracy": acc8, "in_memory_perplexity": q_ppl, "in_memory_accuracy": q_acc,
            "logit_max_abs_diff": diff8, "logit_tolerance": bound,
            "logit_max_abs_diff_vs_fp32": _max_diff(q_reference, reference),
        }
    return {"stages": stages, "export": export}
