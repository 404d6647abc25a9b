"""The teacher as a plain object: load weights safely, answer logits in inference mode.

No Ray here; `teacher_pool.py` wraps this in actors.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from torch import nn

from specs.job import CheckpointTeacher, ExportedTeacher, TrainedTeacher
from trainers.models import build_model


class TeacherLoadError(Exception):
    """The teacher file is missing, unreadable, or does not fit the model the spec names."""


def load_teacher(
    spec: TrainedTeacher | CheckpointTeacher | ExportedTeacher,
    blob: bytes,  # the teacher file's bytes: safetensors, .pt2 or TorchScript
    image_shape: tuple[int, int, int],
    num_classes: int,
) -> nn.Module:
    """Rebuild the teacher from bytes without unpickling anything."""
    if isinstance(spec, ExportedTeacher):
        try:
            if spec.format == "torch_export":
                return torch.export.load(io.BytesIO(blob)).module()
            return torch.jit.load(io.BytesIO(blob), map_location="cpu")
        except Exception as err:  # torch raises many types for a bad file
            raise TeacherLoadError(f"cannot load {spec.format} teacher {spec.path}: {err}") from None
    from safetensors.torch import load as load_safetensors

    model = build_model(spec.model, image_shape, num_classes)
    try:
        state = load_safetensors(blob)
    except Exception as err:
        raise TeacherLoadError(f"teacher weights are not a valid safetensors file: {err}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        wrong = sorted(k for k in expected.keys() & given.keys() if expected[k] != given[k])
        raise TeacherLoadError(
            f"teacher weights do not fit `teacher.model` ({spec.model.kind}): "
            f"missing {sorted(expected.keys() - given.keys())}, "
            f"unexpected {sorted(given.keys() - expected.keys())}, wrong shape {wrong}"
        )
    model.load_state_dict(state)
    return model


class TeacherServer:
    """Holds the teacher in inference mode and turns input batches into logits."""

    def __init__(self, model: nn.Module, precision: str):
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.autocast = precision == "bf16"

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, num_classes) float32."""
        with warnings.catch_warnings():
            # arrays from Ray's object store are read-only, zero-copy views; the model only
            # reads its input, so sharing the buffer is safe and saves a copy per batch
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = torch.from_numpy(np.ascontiguousarray(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(inputs)
        return out.float().numpy()
