"""Quantization: which layers get how many bits, fake-quantized training, and the int8 runtimes.

Weights are quantized by `trainers.codec` (per output channel, symmetric): int8, 2-bit ternary or
1-bit binary. Training with quantized weights (QAT, binarization) swaps each Linear/Conv module's
class for one whose forward uses the fake-quantized weight with a straight-through gradient; the
parameters stay the same objects under the same names, so DeepSpeed, the pruning masks and the
checkpoints are untouched. The exported file stores exactly the weights that forward used.

The int8 runtimes are PyTorch's own quantization stack, `torch.ao.quantization`, which ships in the
pinned torch wheel and runs int8 kernels (x86 / fbgemm) on CPU:

* dynamic: Linear layers become `torch.ao.nn.quantized.dynamic.Linear` (int8 weights, activations
  quantized per batch); conv layers keep their dequantized int8 weights in fp32;
* static: FX graph mode (`prepare_fx` / `convert_fx`) with activation ranges calibrated on
  training images; Linear and Conv run on int8 activations.

Upstream marks torch.ao.quantization deprecated in favour of torchao; torchao is not part of the
pinned set, so its deprecation warning is silenced here rather than in users' code.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from trainers.codec import fake_quantize, quantize_weight

QUANT_LAYERS = (nn.Linear, nn.Conv2d)


def layer_kinds(model: nn.Module, method: str) -> dict[str, str]:
    """Module name -> codec kind for every Linear/Conv layer, or {} when nothing is quantized.

    Binary and ternary networks keep their first and last layers at int8, as in XNOR-Net and
    Ternary Weight Networks: those layers are small and carry most of the accuracy loss.
    """
    from trainers.features import is_projection  # feature-KD projections stay fp32

    names = [n for n, m in model.named_modules()
             if isinstance(m, QUANT_LAYERS) and not is_projection(n)]
    if method == "none":
        return {}
    if method in ("dynamic", "static", "qat"):
        return {n: "int8" for n in names}
    if method in ("binary", "ternary"):
        return {n: (method if 0 < i < len(names) - 1 else "int8") for i, n in enumerate(names)}
    raise ValueError(f"unknown quantization method {method!r}")


def weight_kinds(kinds: dict[str, str]) -> dict[str, str]:
    """Parameter name -> codec kind (weights only; biases stay fp32)."""
    return {f"{name}.weight": kind for name, kind in kinds.items()}


# ----------------------------------------------------------------------- quantized training


class _FakeQuantLinear(nn.Linear):
    qkind: str
    qmask: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.qkind, self.qmask), self.bias)


class _FakeQuantConv2d(nn.Conv2d):
    qkind: str
    qmask: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, fake_quantize(self.weight, self.qkind, self.qmask), self.bias)


def enable_fake_quant(
    model: nn.Module, kinds: dict[str, str], masks: dict[str, torch.Tensor] | None = None
) -> None:
    """From now on the named layers compute with quantized weights (in place, same parameters)."""
    masks = masks or {}
    for name, module in model.named_modules():
        if name not in kinds:
            continue
        if isinstance(module, nn.Linear):
            module.__class__ = _FakeQuantLinear
        elif isinstance(module, nn.Conv2d):
            module.__class__ = _FakeQuantConv2d
        else:
            raise TypeError(f"{name} is a {type(module).__name__}, not Linear/Conv2d")
        module.qkind = kinds[name]
        module.qmask = masks.get(f"{name}.weight")


@torch.no_grad()
def quantize_state(
    state: dict[str, torch.Tensor], kinds: dict[str, str], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The fp32 state dict with every quantized weight replaced by its dequantized value."""
    from trainers.codec import dequantize

    out = dict(state)
    for name, kind in weight_kinds(kinds).items():
        out[name] = dequantize(*quantize_weight(state[name], kind, masks.get(name)))
    return out


# -------------------------------------------------------------------------------- runtimes


@contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.ao")
        yield


@torch.no_grad()
def dynamic_int8(model: nn.Module) -> nn.Module:
    """Linear layers on int8 kernels with the weights' own per-channel int8 codes.

    `model`'s weights must already be on their int8 grid (from `quantize_state`): the codes are
    recomputed from them exactly, so the runtime and the exported file hold the same integers.
    Binary / ternary weights are on that grid too (codes ±127 or 0 at scale/127).
    """
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    model = copy.deepcopy(model).eval()
    with _quiet():
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is not nn.Linear:
                    continue
                codes, scale = quantize_weight(child.weight, "int8")
                qweight = torch._make_per_channel_quantized_tensor(
                    codes, scale.double(), torch.zeros(len(scale), dtype=torch.long), 0
                )
                q = DynamicLinear(child.in_features, child.out_features, dtype=torch.qint8)
                q.set_weight_bias(qweight, None if child.bias is None else child.bias.float())
                setattr(parent, child_name, q)
    return model


def _static_mapping():
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    activation = MinMaxObserver.with_args(dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    # symmetric [-127, 127] per channel: the scale is max|w| / 127, the codec's int8 grid
    weight = PerChannelMinMaxObserver.with_args(
        dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-127, quant_max=127
    )
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def _prepare_static(model: nn.Module, example: torch.Tensor):
    from torch.ao.quantization.quantize_fx import prepare_fx

    with _quiet():
        return prepare_fx(copy.deepcopy(model).eval(), _static_mapping(), (example,))


@torch.no_grad()
def calibrate_static(model: nn.Module, x: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Activation ranges: observer name -> tensor([min, max]) over the calibration images."""
    prepared = _prepare_static(model, x[:1])
    for i in range(0, len(x), batch):
        prepared(x[i : i + batch])
    return {
        name: torch.stack([m.min_val.detach().clone(), m.max_val.detach().clone()]).float()
        for name, m in prepared.named_modules()
        if name and hasattr(m, "min_val") and m.min_val.dim() == 0
    }


@torch.no_grad()
def static_int8(
    model: nn.Module, ranges: dict[str, torch.Tensor], image_shape: tuple[int, int, int]
) -> nn.Module:
    """int8 weights and activations (FX graph mode) from the calibrated activation ranges."""
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare_static(model, torch.zeros(1, *image_shape))
    observers = dict(prepared.named_modules())
    missing = sorted(set(ranges) ^ {n for n, m in observers.items()
                                    if n and hasattr(m, "min_val") and m.min_val.dim() == 0})
    if missing:
        raise ValueError(f"activation ranges do not fit this model: {missing}")
    for name, r in ranges.items():
        observers[name].min_val.copy_(r[0])
        observers[name].max_val.copy_(r[1])
    with _quiet():
        return convert_fx(prepared)

