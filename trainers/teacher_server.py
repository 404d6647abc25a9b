"""The teacher as a plain object: load weights safely, answer logits in inference mode.

No Ray here; `teacher_pool.py` wraps this in actors.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from specs.errors import InputError
from specs.job import CheckpointTeacher, ExportedTeacher, TrainedTeacher
from trainers.models import build_model


class TeacherLoadError(InputError):
    """The teacher file is missing, unreadable, or does not fit the model the spec names."""


def load_teacher(
    spec: TrainedTeacher | CheckpointTeacher | ExportedTeacher,
    blob: bytes,  # the teacher file's bytes: safetensors, .pt2 or TorchScript
    image_shape: tuple[int, int, int],
    num_classes: int,
    trusted: frozenset[str] = frozenset(),
) -> nn.Module:
    """Rebuild the teacher from bytes without unpickling anything.

    An exported program (torch.export's .pt2 or TorchScript) is the user's own model with its
    own preprocessing, if any, folded in: it receives exactly what the student receives (the
    data section's preprocessed, normalized batch) and must answer (B, num_classes) logits.
    """
    if isinstance(spec, ExportedTeacher):
        try:
            if spec.format == "torch_export":
                return torch.export.load(io.BytesIO(blob)).module()
            return torch.jit.load(io.BytesIO(blob), map_location="cpu")
        except Exception as err:  # torch raises many types for a bad file
            raise TeacherLoadError(f"cannot load {spec.format} teacher {spec.path}: {err}") from None
    from safetensors.torch import load as load_safetensors

    model = build_model(spec.model, image_shape, num_classes, trusted, where="teacher.model")
    try:
        state = load_safetensors(blob)
    except Exception as err:
        raise TeacherLoadError(f"teacher weights are not a valid safetensors file: {err}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    if expected != given:
        def first(names) -> str:
            names = sorted(names)
            return f"{names[:5]}{f' and {len(names) - 5} more' if len(names) > 5 else ''}"

        wrong = [f"{k} {given[k]} (model: {expected[k]})"
                 for k in sorted(expected.keys() & given.keys()) if expected[k] != given[k]]
        raise TeacherLoadError(
            f"teacher weights do not fit `teacher.model` ({spec.model.kind}): "
            f"missing {first(expected.keys() - given.keys())}, "
            f"unexpected {first(given.keys() - expected.keys())}, wrong shape {first(wrong)}"
        )
    model.load_state_dict(state)
    return model.eval()


def inference_mode_(model: nn.Module) -> nn.Module:
    """`model.eval()`, except for a module of `torch.export.load(...).module()`: its train/eval
    behaviour was fixed when it was exported (the docs export in eval mode), and torch 2.13
    raises NotImplementedError on `.eval()` there."""
    try:
        return model.eval()
    except NotImplementedError:
        return model


class TeacherServer:
    """Holds the teacher in inference mode and turns input batches into logits.

    With `feature_layers` each answer row also carries those modules' outputs, flattened, after
    the logits (the wire format of trainers/features.py).
    """

    def __init__(self, model: nn.Module, precision: str, feature_layers: list[str] | None = None,
                 device: torch.device | None = None):
        """`device`: where the forward runs (trainers/device.py decides; default CPU). Inputs
        arrive and logits leave as NumPy arrays on the host, for the object store."""
        self.device = device if device is not None else torch.device("cpu")
        self.model = inference_mode_(model.to(self.device))
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.autocast = precision != "fp32"  # bf16 under autocast
        self.tap = None
        if feature_layers:
            from trainers.features import FeatureTap

            self.tap = FeatureTap(self.model, list(feature_layers))

    @torch.inference_mode()
    def logits(self, x: np.ndarray) -> np.ndarray:
        """(B, C, H, W) float32 -> (B, num_classes [+ feature sizes]) float32."""
        with warnings.catch_warnings():
            # arrays from Ray's object store are read-only, zero-copy views; the model only
            # reads its input, so sharing the buffer is safe and saves a copy per batch
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            inputs = torch.from_numpy(np.ascontiguousarray(x)).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(inputs)
        if self.tap is not None:
            parts = [out, *(f.flatten(1) for f in self.tap.take())]
            out = torch.cat([t.float() for t in parts], dim=1)
        return out.float().cpu().numpy()


class RequestBatcher:
    """Coalesces concurrent requests (from every student) into one call of `fn`.

    A request waits at most `max_wait_s` for others to join it, and a batch is sent at once when
    it reaches `max_rows`. Calls run one at a time on a worker thread (torch releases the GIL),
    so requests that arrive while the teacher is busy form the next batch. Plain asyncio: the
    Ray actor only awaits `submit`.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_rows: int, max_wait_s: float,
                 coalesce: bool = True):
        """`coalesce=False`: every request is its own forward, whatever arrives with it. A row's
        logits then depend only on its request (CPU kernels may sum a row's products in another
        order in a larger batch), which is what makes a deterministic job repeat itself."""
        self.fn, self.max_rows, self.max_wait_s = fn, max_rows, max_wait_s
        self.coalesce = coalesce
        self._items: list = []  # (input batch, future)
        self._rows = 0
        self._timer = None
        self._executor = ThreadPoolExecutor(max_workers=1)
        self.calls = 0  # forwards run
        self.requests = 0  # requests answered

    async def submit(self, x: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._items.append((x, future))
        self._rows += len(x)
        if self._rows >= self.max_rows or not self.coalesce:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        items, self._items, self._rows = self._items, [], 0
        if items:
            asyncio.ensure_future(self._run(items))

    async def _run(self, items: list) -> None:
        loop = asyncio.get_running_loop()
        try:
            out = await loop.run_in_executor(
                self._executor, self.fn, np.concatenate([x for x, _ in items])
            )
        except Exception as err:  # every waiting request gets the failure
            for _, future in items:
                if not future.done():
                    future.set_exception(err)
            return
        self.calls += 1
        start = 0
        for x, future in items:
            if not future.done():
                future.set_result(out[start : start + len(x)])
            self.requests += 1
            start += len(x)
