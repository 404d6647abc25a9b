"""What each worker group runs, phase by phase, and the learning rate at each step.

Pure functions of the spec: the driver and the workers compute the same plan, and the driver
knows the checkpoint names to look for before it starts anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from specs.job import JobSpec
from trainers.pruning import round_sparsity


@dataclass(frozen=True)
class Phase:
    index: int
    name: str  # also the checkpoint folder's name
    kind: Literal["teacher", "dense", "prune", "quantize"]
    epochs: int
    target_sparsity: float = 0.0
    round: int = 0  # pruning round, 1-based; 0 before pruning


TEACHER_CHECKPOINT = "teacher"


def teacher_phases(spec: JobSpec) -> list[Phase]:
    return [Phase(0, TEACHER_CHECKPOINT, "teacher", spec.teacher.epochs)]


def student_phases(spec: JobSpec) -> list[Phase]:
    """Dense distillation, then one phase per pruning round (prune, then fine-tune by KD), then
    for QAT / binarization / ternarization one phase of distillation on quantized weights."""
    phases = [Phase(0, "student-00-dense", "dense", spec.student.epochs)]
    if spec.pruning.enabled:
        for r in range(1, spec.pruning.rounds + 1):
            phases.append(
                Phase(
                    r, f"student-{r:02d}-round{r}", "prune", spec.pruning.round_epochs(r),
                    target_sparsity=round_sparsity(spec.pruning, r), round=r,
                )
            )
    if spec.quantization.trains:
        last = phases[-1]
        phases.append(
            Phase(
                len(phases), f"student-{len(phases):02d}-{spec.quantization.method}", "quantize",
                spec.quantization.finetune_epochs, target_sparsity=last.target_sparsity,
                round=last.round,
            )
        )
    return phases


def cosine_lr(step: int, total_steps: int, base_lr: float, final_ratio: float = 0.05) -> float:
    """Cosine decay from `base_lr` to `final_ratio * base_lr` over one phase."""
    if total_steps <= 1:
        return base_lr
    progress = min(1.0, step / (total_steps - 1))
    return base_lr * (final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))
