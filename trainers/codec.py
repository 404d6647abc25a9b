"""Tensor codecs for storing compressed weights compactly.

Two layers, both pure functions on CPU torch tensors:

* quantizers: `quantize_weight` turns a weight into int8 codes plus a float32 scale per output
  channel (axis 0) for the "int8", "ternary" and "binary" kinds; `dequantize` inverts it and
  `fake_quantize` is the straight-through version used during quantization-aware training;
* storage: `encode` packs one weight (dense or pruned, any kind) into a few small tensors that
  safetensors can hold plus a JSON-serialisable description; `decode` inverts it exactly.

See `encode` for the storage layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KINDS = ("fp32", "int8", "ternary", "binary")
BITS = {"fp32": 32, "int8": 8, "ternary": 2, "binary": 1}
QUANTIZED = ("int8", "ternary", "binary")

TERNARY_DELTA = 0.7  # threshold factor of Ternary Weight Networks (Li et al. 2016)
GAP_MAX = 255  # the largest distance one uint8 gap entry holds
GAP_FILLER = 0  # gap entry meaning "advance GAP_MAX positions, store no value"


# ------------------------------------------------------------------------------- quantization


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def _kept(mask: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """The mask as a bool tensor of w's shape (all True when there is none)."""
    if mask is None:
        return torch.ones(w.shape, dtype=torch.bool, device=w.device)
    if tuple(mask.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from weight {tuple(w.shape)}")
    return mask.detach().to(w.device) != 0


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """View t as [channels, rest]; a 1-D tensor has one entry per channel."""
    return t.reshape(t.shape[0], 1) if t.dim() == 1 else t.flatten(1)


def _channel_mean(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of values over `where` per row; 1.0 for rows where nothing is selected."""
    count = where.sum(dim=1)
    total = torch.where(where, values, torch.zeros_like(values)).sum(dim=1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))


def quantize_weight(
    w: torch.Tensor, kind: str, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale): int8 codes of w's shape and a float32 scale per output channel (axis 0).

    Computed in float32 whatever w's dtype. Positions where mask == 0 get code 0 and take no part
    in the scales. Per channel c, over its kept entries:

    * int8: scale = max|w| / 127 (1.0 if the channel has no kept or only zero entries);
      code = clamp(round(w / scale), -127, 127), rounding half to even;
    * binary: scale = mean|w| (1.0 if none kept); code = +1 where w >= 0, else -1;
    * ternary (Ternary Weight Networks, Li et al. 2016): delta = 0.7 * mean|w|;
      code = sign(w) where |w| > delta, else 0; scale = mean|w| over the entries with
      |w| > delta (1.0 if there are none).

    A channel with a NaN or infinite kept entry gets a NaN scale (and codes 0), so the fault shows
    in its dequantized values instead of being hidden. "fp32" is not a quantized kind and raises
    ValueError, as do 0-d tensors.
    """
    _check_kind(kind)
    if kind not in QUANTIZED:
        raise ValueError(f"kind {kind!r} is not quantized; expected one of {QUANTIZED}")
    if w.dim() == 0:
        raise ValueError("a quantized weight needs at least one dimension (the output channels)")
    kept = _kept(mask, w)
    w32 = w.detach().to(torch.float32)
    channels = w.shape[0]
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.int8, device=w.device), torch.ones(
            channels, dtype=torch.float32, device=w.device
        )

    x, keep = _per_channel(w32), _per_channel(kept)
    a = x.abs()
    if kind == "int8":
        amax = torch.where(keep, a, torch.zeros_like(a)).amax(dim=1)
        scale = amax / 127
        # a subnormal max can underflow to a zero scale: treat it like an all-zero channel
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.clamp(torch.round(x / scale[:, None]), -127, 127)
    elif kind == "binary":
        scale = _channel_mean(a, keep)
        codes = torch.where(x >= 0, 1.0, -1.0)
    else:  # ternary
        delta = TERNARY_DELTA * _channel_mean(a, keep)
        big = keep & (a > delta[:, None])
        scale = _channel_mean(a, big)
        codes = torch.where(big, torch.sign(x), torch.zeros_like(x))
    # no raising here: fake_quantize runs in the forward pass, where a NaN must reach the loss,
    # whose check skips the step on every rank alike
    broken = (keep & ~torch.isfinite(x)).any(dim=1)
    scale = torch.where(broken, torch.full_like(scale, math.nan), scale)
    codes = torch.where(keep & ~broken[:, None], codes, torch.zeros_like(codes))
    return codes.to(torch.int8).reshape(w.shape), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 codes * scale, the scale broadcast along axis 0."""
    shape = (codes.shape[0],) + (1,) * (codes.dim() - 1)
    return codes.to(torch.float32) * scale.to(torch.float32).reshape(shape)


def fake_quantize(w: torch.Tensor, kind: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized weight in w's dtype, with a straight-through gradient to w.

    Forward: dequantize(*quantize_weight(w, kind, mask)) cast to w.dtype. Backward: the gradient
    passes to w unchanged.
    """
    q = dequantize(*quantize_weight(w, kind, mask)).to(w.dtype)
    # q + (w - w.detach()) rather than w + (q - w).detach(): the latter rounds twice in floating
    # point and can miss q by an ulp; w - w.detach() is exactly zero and has the identity gradient
    return q + (w - w.detach())


# ------------------------------------------------------------------------------------ storage


def _pack_values(values: torch.Tensor, kind: str) -> torch.Tensor:
    """The stored values (1-D, kept positions only) in the kind's compact form."""
    if kind == "fp32":
        return values.to(torch.float32).contiguous()
    if kind == "int8":
        return values.to(torch.int8).contiguous()
    codes = values.numpy().astype(np.int8)
    if kind == "binary":
        return torch.from_numpy(np.packbits(codes > 0))
    # ternary: -1, 0, +1 stored as 0, 1, 2 in two bits, four to a byte, first value lowest
    twos = (codes + 1).astype(np.uint8)
    twos = np.concatenate([twos, np.ones(-len(twos) % 4, dtype=np.uint8)]).reshape(-1, 4)
    packed = twos[:, 0] | (twos[:, 1] << 2) | (twos[:, 2] << 4) | (twos[:, 3] << 6)
    return torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8))


def _unpack_values(packed: torch.Tensor, kind: str, count: int) -> torch.Tensor:
    """Inverse of _pack_values: float32 values for fp32, int8 codes otherwise."""
    if kind in ("fp32", "int8"):
        if packed.numel() != count:
            raise ValueError(f"expected {count} stored values, found {packed.numel()}")
        return packed.to(torch.float32 if kind == "fp32" else torch.int8).reshape(-1)
    raw = packed.numpy().astype(np.uint8).reshape(-1)
    per_byte = 8 // BITS[kind]
    if raw.size != math.ceil(count / per_byte):
        raise ValueError(f"{raw.size} bytes cannot hold {count} {kind} values")
    if kind == "binary":
        bits = np.unpackbits(raw, count=count)
        return torch.from_numpy(bits.astype(np.int8) * 2 - 1)
    twos = ((raw[:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3).reshape(-1)[:count]
    if (twos > 2).any():
        raise ValueError("ternary values hold an invalid 2-bit code")
    return torch.from_numpy(twos.astype(np.int8) - 1)


def _gaps(kept: np.ndarray) -> np.ndarray:
    """Relative positions of the True entries of a flat bool array (see `encode`)."""
    index = np.flatnonzero(kept)
    dist = np.diff(index, prepend=-1)  # every distance >= 1: the first counts from position -1
    fillers = (dist - 1) // GAP_MAX
    gaps = np.full(len(index) + int(fillers.sum()), GAP_FILLER, dtype=np.uint8)
    gaps[np.cumsum(fillers + 1) - 1] = dist - fillers * GAP_MAX
    return gaps


def _positions_from_gaps(gaps: np.ndarray) -> np.ndarray:
    steps = np.where(gaps == GAP_FILLER, GAP_MAX, gaps).astype(np.int64)
    return (np.cumsum(steps) - 1)[gaps != GAP_FILLER]


def _gaps_size(kept: np.ndarray) -> int:
    index = np.flatnonzero(kept)
    return len(index) + int(((np.diff(index, prepend=-1) - 1) // GAP_MAX).sum())


def encode(
    w: torch.Tensor, kind: str, mask: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Store one weight tensor compactly: (tensors, info).

    tensors maps a suffix to a contiguous tensor of a dtype safetensors holds (the caller prefixes
    the suffixes with the parameter name):

    * "values": the stored values in flat (row-major) order: float32 for fp32; int8 codes for
      int8; one bit per value for binary (np.packbits of code > 0, so ceil(n/8) bytes); two bits
      per value for ternary (codes -1, 0, +1 as 0, 1, 2, four values to a byte with the first in
      the lowest bits, so ceil(n/4) bytes);
    * "scale" (quantized kinds): float32 per output channel, as `quantize_weight` gives it;
    * "positions" (sparse only): where the values go, in whichever encoding is smaller here
      (the bitmap on a tie):
      - "bitmap": one bit per position of the flat tensor, np.packbits of the mask (uint8);
      - "gaps": the relative index of Deep Compression (Han et al. 2016), one uint8 per kept
        position giving its distance from the previous kept position (the first counts from
        position -1, so every distance is 1..255). A distance over 255 is bridged by filler
        entries: each filler is a 0 byte that advances 255 positions and stores no value. Deep
        Compression's fillers instead land on a position and carry a zero value; that does not
        work for binary, whose 1-bit values have no zero, and costs a stored value per filler.

    Sparse storage (only the kept positions' values) is used when a mask is given, or, without
    one, when more than half of w is exactly zero; the mask is then w != 0, and that is the mask
    the quantizer sees. Otherwise every value is stored and "positions" is absent. A NaN or
    infinite kept value raises ValueError: a stored model with one is broken upstream.

    info (JSON-serialisable): kind, shape, dtype (of w), sparse, positions ("bitmap", "gaps" or
    None), nnz (kept positions: all of them when dense) and bytes (of all the tensors).
    """
    _check_kind(kind)
    w32 = w.detach().to("cpu", torch.float32)
    if mask is not None:
        kept = _kept(mask.detach().cpu(), w32)
    elif 2 * int((w32 == 0).sum()) > w32.numel():
        kept = w32 != 0
    else:
        kept = None
    finite = torch.isfinite(w32) if kept is None else torch.isfinite(w32) | ~kept
    if not bool(finite.all()):
        raise ValueError(f"cannot store a {tuple(w.shape)} weight with NaN or infinite entries")

    tensors: dict[str, torch.Tensor] = {}
    if kind == "fp32":
        flat = w32.reshape(-1)
    else:
        codes, scale = quantize_weight(w32, kind, kept)
        flat = codes.reshape(-1)
        tensors["scale"] = scale.contiguous()

    positions = None
    if kept is None:
        values = flat
    else:
        kept_flat = kept.reshape(-1).numpy()
        values = flat[torch.from_numpy(kept_flat)]
        positions = "gaps" if _gaps_size(kept_flat) < math.ceil(kept_flat.size / 8) else "bitmap"
        packed = _gaps(kept_flat) if positions == "gaps" else np.packbits(kept_flat)
        tensors["positions"] = torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8))
    tensors["values"] = _pack_values(values, kind)

    info = {
        "kind": kind,
        "shape": list(w.shape),
        "dtype": str(w.dtype).removeprefix("torch."),
        "sparse": kept is not None,
        "positions": positions,
        "nnz": int(values.numel()),
        "bytes": encoded_bytes(tensors),
    }
    return tensors, info


def decode(tensors: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """Inverse of `encode`: the float32 tensor.

    Exactly w * mask for fp32 and dequantize(*quantize_weight(w, kind, mask)) for the quantized
    kinds, with the mask `encode` used (none when dense).
    """
    kind = info["kind"]
    _check_kind(kind)
    shape = tuple(int(d) for d in info["shape"])
    numel, nnz = math.prod(shape), int(info["nnz"])
    values = _unpack_values(tensors["values"].cpu(), kind, nnz)

    layout = info["positions"]
    if layout is None:
        if nnz != numel:
            raise ValueError(f"a dense tensor of shape {shape} needs {numel} values, found {nnz}")
        flat = values
    else:
        raw = tensors["positions"].cpu().numpy().astype(np.uint8).reshape(-1)
        if layout == "bitmap":
            index = np.flatnonzero(np.unpackbits(raw, count=numel))
        elif layout == "gaps":
            index = _positions_from_gaps(raw)
        else:
            raise ValueError(f"unknown positions encoding {layout!r}")
        if len(index) != nnz or (nnz and index[-1] >= numel):
            raise ValueError(f"positions do not match {nnz} values in a tensor of {numel}")
        flat = torch.zeros(numel, dtype=values.dtype)
        flat[torch.from_numpy(index)] = values
    out = flat.reshape(shape)
    return out.to(torch.float32) if kind == "fp32" else dequantize(out, tensors["scale"].cpu())


def encoded_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
