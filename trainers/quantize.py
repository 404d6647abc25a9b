"""Quantization: which layers get how many bits, fake-quantized training, and the int8 runtimes.

Weights are quantized by `trainers.codec` (per output channel, symmetric): int8, 2-bit ternary or
1-bit binary. Training with quantized weights (QAT, binarization) swaps each Linear/Conv module's
class for one whose forward uses the fake-quantized weight with a straight-through gradient; the
parameters stay the same objects under the same names, so DeepSpeed, the pruning masks and the
checkpoints are untouched. The exported file stores exactly the weights that forward used.

Weight sharing (`kmeans`, Deep Compression's trained quantization) uses the same class swap: the
kept weights of each layer are clustered once, when the fine-tuning starts (`weight_clusters`);
the forward uses each weight's cluster mean, so each weight gets its cluster's averaged gradient;
and after every optimizer step `snap_shared_weights_` sets the weights to their cluster means, so
that the checkpoints hold at most 2^bits distinct values per layer and pruned weights stay zero.
Those shared values run as fp32 weights.

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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from specs.job import KMeansBits
from trainers.codec import (
    SHARED, cluster_mean, fake_quantize, kmeans_clusters, kmeans_kind, quantize_weight,
    share_weight,
)

QUANT_LAYERS = (nn.Linear, nn.Conv2d)


def layer_kinds(model: nn.Module, method: str, bits: KMeansBits | None = None) -> dict[str, str]:
    """Module name -> codec kind for every Linear/Conv layer, or {} when nothing is quantized.

    Binary and ternary networks keep their first and last layers at int8, as in XNOR-Net and
    Ternary Weight Networks: those layers are small and carry most of the accuracy loss. Weight
    sharing (`kmeans`) gives every layer `bits.linear` or `bits.conv` bits.
    """
    from trainers.features import is_projection  # feature-KD projections stay fp32

    layers = {n: m for n, m in model.named_modules()
              if isinstance(m, QUANT_LAYERS) and not is_projection(n)}
    names = list(layers)
    if method == "none":
        return {}
    if method == "kmeans":
        if bits is None:
            raise ValueError("weight sharing needs the bits per layer type (`quantization.bits`)")
        return {n: kmeans_kind(bits.conv if isinstance(m, nn.Conv2d) else bits.linear)
                for n, m in layers.items()}
    if method in ("dynamic", "static", "qat"):
        return {n: "int8" for n in names}
    if method in ("binary", "ternary"):
        return {n: (method if 0 < i < len(names) - 1 else "int8") for i, n in enumerate(names)}
    raise ValueError(f"unknown quantization method {method!r}")


def weight_kinds(kinds: dict[str, str]) -> dict[str, str]:
    """Parameter name -> codec kind (weights only; biases stay fp32)."""
    return {f"{name}.weight": kind for name, kind in kinds.items()}


# ----------------------------------------------------------------------- quantized training


@dataclass(frozen=True)
class WeightClusters:
    """One layer's fixed cluster assignment, in the form the forward and the snap use."""

    index: torch.Tensor  # int64 [nnz]: flat positions of the kept weights, ascending
    codes: torch.Tensor  # int64 [nnz]: the cluster of each
    counts: torch.Tensor  # float32 [k]: weights per cluster (none is empty)

    @classmethod
    def from_codes(cls, codes: torch.Tensor) -> "WeightClusters":
        """From per-weight codes of the weight's shape (-1 = pruned, in no cluster)."""
        flat = codes.reshape(-1).to("cpu", torch.int64)
        index = torch.nonzero(flat >= 0).reshape(-1)
        kept = flat[index]
        counts = torch.bincount(kept, minlength=int(kept.max()) + 1 if len(kept) else 0)
        if bool((counts == 0).any()):
            raise ValueError("cluster codes leave a cluster empty")
        return cls(index, kept, counts.to(torch.float32))


def _quantized_weight(module: nn.Module) -> torch.Tensor:
    if module.qclusters is not None:
        c = module.qclusters
        return cluster_mean(module.weight, c.index, c.codes, c.counts)
    return fake_quantize(module.weight, module.qkind, module.qmask)


class _FakeQuantLinear(nn.Linear):
    qkind: str
    qmask: torch.Tensor | None
    qclusters: WeightClusters | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _quantized_weight(self), self.bias)


class _FakeQuantConv2d(nn.Conv2d):
    qkind: str
    qmask: torch.Tensor | None
    qclusters: WeightClusters | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, _quantized_weight(self), self.bias)


def enable_fake_quant(
    model: nn.Module, kinds: dict[str, str], masks: dict[str, torch.Tensor] | None = None,
    clusters: dict[str, torch.Tensor] | None = None,
) -> None:
    """From now on the named layers compute with quantized weights (in place, same parameters).

    Weight-sharing kinds need `clusters`: parameter name -> codes of the weight's shape, as
    `weight_clusters` gives them.
    """
    masks, clusters = masks or {}, clusters or {}
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
        module.qclusters = None
        if kinds[name] in SHARED:
            if f"{name}.weight" not in clusters:
                raise ValueError(f"{name} shares weights but has no cluster assignment")
            module.qclusters = WeightClusters.from_codes(clusters[f"{name}.weight"])


@torch.no_grad()
def weight_clusters(
    weights: dict[str, torch.Tensor], kinds: dict[str, str], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Parameter name -> int64 cluster codes (the weight's shape, -1 where pruned) of every
    weight-sharing layer: k-means of its kept weights, computed once, when the fine-tuning
    starts, and fixed from then on. Deterministic: the same weights give the same codes."""
    return {
        f"{name}.weight": kmeans_clusters(
            weights[f"{name}.weight"], SHARED[kind], masks.get(f"{name}.weight"))[1]
        for name, kind in kinds.items() if kind in SHARED
    }


# (flat fp32 master tensor this rank holds, its first position in the flat weight, its length),
# or None when the parameter is its own master (or, with partitioned masters, has none here)
MasterFragment = Callable[[torch.Tensor], "tuple[torch.Tensor, int, int] | None"]


@torch.no_grad()
def snap_shared_weights_(
    model: nn.Module, master_fragment: MasterFragment | None = None, partitioned: bool = False,
) -> None:
    """Set every weight of each weight-sharing layer to its cluster's mean, in place.

    Run after each optimizer step: the optimizer's per-weight state (Adam's moments) moves the
    weights of one cluster apart; this brings them back onto one shared value, the mean of where
    the step left them. The means are taken over the fp32 master copies where the engine keeps
    them (`master_fragment`) and written to both copies; pruned weights are not touched. With
    `partitioned` masters (each rank holds a part of each weight) each rank sums the part it holds
    and the per-cluster sums are all-reduced, so every rank writes the same means; every rank must
    call this then.
    """
    layers = [(m.weight, m.qclusters) for m in model.modules()
              if isinstance(m, (_FakeQuantLinear, _FakeQuantConv2d)) and m.qclusters is not None]
    sums, parts = [], []
    for weight, c in layers:
        fragment = master_fragment(weight) if master_fragment is not None else None
        if fragment is not None:
            master, start, numel = fragment
            master = master.view(-1)
        elif partitioned:  # this rank holds no part of this weight's master
            master, start, numel = None, 0, 0
        else:  # the parameter is its own master
            master, start, numel = weight.detach().view(-1), 0, weight.numel()
        # the kept weights inside [start, start + numel): a run of the ascending index
        lo, hi = (int(i) for i in torch.searchsorted(c.index, torch.tensor([start, start + numel])))
        local = c.index[lo:hi] - start
        total = torch.zeros(len(c.counts), dtype=torch.float64)
        if master is not None:
            total.index_add_(0, c.codes[lo:hi], master[local].double())
        sums.append(total)
        parts.append((master, local, c.codes[lo:hi]))
    if not layers:
        return
    summed = torch.cat(sums)
    if partitioned and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(summed)
    offset = 0
    for (weight, c), (master, local, codes) in zip(layers, parts):
        k = len(c.counts)
        means = (summed[offset : offset + k] / c.counts.double()).to(torch.float32)  # [k]
        offset += k
        if master is not None:
            master[local] = means[codes].to(master.dtype)
        weight.detach().view(-1)[c.index] = means[c.codes].to(weight.dtype)


@torch.no_grad()
def quantize_state(
    state: dict[str, torch.Tensor], kinds: dict[str, str], masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The fp32 state dict with every quantized weight replaced by its dequantized value (for
    weight sharing: its shared values, by k-means unless they are shared already)."""
    from trainers.codec import dequantize

    out = dict(state)
    for name, kind in weight_kinds(kinds).items():
        if kind in SHARED:
            out[name] = share_weight(state[name], SHARED[kind], masks.get(name))
        else:
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

