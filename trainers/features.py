"""Feature distillation: the student's intermediate outputs learn to match the teacher's.

The spec maps student modules to teacher modules (`distillation.features`, names as in
`model.named_modules()`). For each pair the teacher pool returns the teacher module's output with
the logits, and the student's output passes through a learned projection (a Linear, or a 1x1 conv
for feature maps; none when the widths already agree) before a mean-squared error against it.
Feature maps of different spatial size are compared after average-pooling the teacher's to the
student's size. The loss adds `weight * MSE` per pair to the logit KD loss.

Wire format: a replica answers one float32 row per sample, the logits followed by each requested
feature flattened, so batching, prefetching and failover in the pool carry features unchanged;
`split_teacher_output` takes the row apart again.

The projections live in the student module under `kd_proj` (so DeepSpeed trains, partitions and
checkpoints them with the student), are never pruned or quantized, and are not part of the
exported student.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from specs.errors import InputError

KD_PREFIX = "kd_proj"


class FeatureSpecError(InputError, ValueError):
    """`distillation.features` names a module the model lacks, or shapes that cannot be matched."""


def is_projection(name: str) -> bool:
    return name == KD_PREFIX or name.startswith(KD_PREFIX + ".")


def student_only(state: dict) -> dict:
    """A state dict without the feature projections."""
    return {k: v for k, v in state.items() if not is_projection(k)}


class FeatureTap:
    """Keeps the latest output of each named module (forward hooks)."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            available = [n for n in modules if n and not is_projection(n)]
            raise FeatureSpecError(f"no module named {missing}; the model has {available}")
        self.names = list(names)
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def take(self) -> list[torch.Tensor]:
        outs = [self.outputs[n] for n in self.names]
        self.outputs = {}
        return outs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def feature_shapes(model: nn.Module, names: list[str], image_shape: tuple) -> list[tuple[int, ...]]:
    """Per-sample output shapes of the named modules."""
    tap = FeatureTap(model, names)
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(2, *image_shape))
        return [tuple(t.shape[1:]) for t in tap.take()]
    finally:
        tap.remove()


def check_feature_spec(spec, image_shape: tuple, num_classes: int,
                       trusted: frozenset[str] = frozenset()):
    """(student shapes, teacher shapes) of the spec's feature pairs; raises FeatureSpecError."""
    from trainers.models import build_model

    pairs = spec.distillation.features
    if not pairs:
        return [], []
    student = build_model(spec.student.model, image_shape, num_classes, trusted, "student.model")
    teacher = build_model(spec.teacher.model, image_shape, num_classes, trusted, "teacher.model")
    try:
        s_shapes = feature_shapes(student, [p.student for p in pairs], image_shape)
    except FeatureSpecError as err:
        raise FeatureSpecError(f"`distillation.features[].student`: {err}") from None
    try:
        t_shapes = feature_shapes(teacher, [p.teacher for p in pairs], image_shape)
    except FeatureSpecError as err:
        raise FeatureSpecError(f"`distillation.features[].teacher`: {err}") from None
    for i, (s, t) in enumerate(zip(s_shapes, t_shapes)):
        if len(s) != len(t) or len(s) not in (1, 3):
            raise FeatureSpecError(
                f"`distillation.features[{i}]`: student output {s} and teacher output {t} must "
                "both be vectors or both be feature maps (C, H, W)"
            )
    return s_shapes, t_shapes


def build_projections(s_shapes: list[tuple], t_shapes: list[tuple]) -> nn.ModuleList:
    projections = []
    for s, t in zip(s_shapes, t_shapes):
        if s[0] == t[0]:
            projections.append(nn.Identity())
        elif len(s) == 1:
            projections.append(nn.Linear(s[0], t[0]))
        else:
            projections.append(nn.Conv2d(s[0], t[0], kernel_size=1))
    return nn.ModuleList(projections)


def feature_loss(
    student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
    projections: nn.ModuleList, weights: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted sum of MSEs, the same detached) in float32."""
    total = torch.zeros((), dtype=torch.float32)
    for s, t, proj, w in zip(student_feats, teacher_feats, projections, weights):
        p = proj(s).float()
        t = t.float()
        if p.dim() == 4 and p.shape[-2:] != t.shape[-2:]:
            t = F.adaptive_avg_pool2d(t, p.shape[-2:])
        total = total + w * F.mse_loss(p, t)
    return total, total.detach()


def split_teacher_output(
    rows: np.ndarray, num_classes: int, shapes: list[tuple[int, ...]]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(B, C + sum of feature sizes) -> logits (B, C) and each feature (B, *shape)."""
    logits = rows[:, :num_classes]
    feats, start = [], num_classes
    for shape in shapes:
        size = int(np.prod(shape))
        feats.append(rows[:, start : start + size].reshape(len(rows), *shape))
        start += size
    if start != rows.shape[1]:
        raise ValueError(f"teacher rows have {rows.shape[1]} columns, expected {start}")
    return logits, feats
