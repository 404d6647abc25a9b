"""Tensor codecs for storing compressed weights compactly.

Two layers, both pure functions on CPU torch tensors:

* quantizers: `quantize_weight` turns a weight into int8 codes plus a float32 scale per output
  channel (axis 0) for the "int8", "ternary" and "binary" kinds; `dequantize` inverts it and
  `fake_quantize` is the straight-through version used during quantization-aware training;
* weight sharing (Deep Compression, Han et al. 2016), the "kmeans1" .. "kmeans8" kinds: the kept
  weights of a layer share at most 2^bits values, a per-layer codebook found by k-means
  (`kmeans_clusters`, `share_weight`), and `cluster_mean` is the forward used while fine-tuning
  the shared values;
* storage: `encode` packs one weight (dense or pruned, any kind) into a few small tensors that
  safetensors can hold plus a JSON-serialisable description; `decode` inverts it exactly.

See `encode` for the storage layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch

KINDS = ("fp32", "int8", "ternary", "binary")
QUANTIZED = ("int8", "ternary", "binary")
# weight sharing: a per-layer codebook of at most 2^bits values, one b-bit code per kept weight
SHARED = {f"kmeans{b}": b for b in range(1, 9)}
BITS = {"fp32": 32, "int8": 8, "ternary": 2, "binary": 1, **SHARED}
# Lloyd's iterations: a pruned 300x784 layer settles after 30-450 of them (~0.1 ms each); the
# cap only guards against floating-point ties cycling forever
KMEANS_MAX_ITERATIONS = 10_000

TERNARY_DELTA = 0.7  # threshold factor of Ternary Weight Networks (Li et al. 2016)
GAP_MAX = 255  # the largest distance one uint8 gap entry holds
GAP_FILLER = 0  # gap entry meaning "advance GAP_MAX positions, store no value"


# ------------------------------------------------------------------------------- quantization


def _check_kind(kind: str) -> None:
    if kind not in KINDS and kind not in SHARED:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS} or kmeans1 .. kmeans8")


def kmeans_kind(bits: int) -> str:
    """The codec kind of weight sharing with at most 2^bits values per layer."""
    kind = f"kmeans{bits}"
    if kind not in SHARED:
        raise ValueError(f"weight sharing takes 1 to 8 bits, not {bits}")
    return kind


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


# ----------------------------------------------------------------------------- weight sharing


def kmeans_clusters(
    w: torch.Tensor, bits: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, codes): the kept weights of w in at most 2^bits clusters, by k-means.

    codebook: float32 [k], the clusters' means in ascending order (k <= 2^bits; a cluster that
    ends up empty is dropped, so k can be smaller). codes: int64 of w's shape, each kept weight's
    cluster (0..k-1), -1 where mask == 0: pruned weights belong to no cluster and stay zero.

    Initialisation is linear, as in Deep Compression (Han et al. 2016, section 3.2): k centroids
    evenly spaced between the smallest and the largest kept weight. The paper compared it with
    random (Forgy) and density-based initialisation and found it best, because it gives the few
    large weights, which matter most, centroids of their own, where the other two spend nearly
    every centroid on the dense middle of the distribution. It also involves no randomness: the
    same weights give the same clusters on every rank and on every resume.

    Lloyd's iterations run in float64 until the assignment stops changing (at most
    KMEANS_MAX_ITERATIONS). Written here rather than taken from scikit-learn's KMeans: in one
    dimension the sorted weights fall into contiguous runs split at the midpoints between adjacent
    centroids, so an iteration is one searchsorted plus prefix-sum differences (O(k log n), no
    distance matrix); and scikit-learn sums its clusters in per-thread buffers merged in the
    order the threads finish, so its centroids can differ in the last bits from run to run, while
    these must be identical on every rank and every resume. A NaN or infinite kept weight raises
    ValueError.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"weight sharing takes 1 to 8 bits, not {bits}")
    kept = _kept(mask, w).reshape(-1).cpu()
    index = torch.nonzero(kept).reshape(-1)  # flat positions of the kept weights, ascending
    x = w.detach().to("cpu", torch.float64).reshape(-1)[index]
    codes = torch.full((w.numel(),), -1, dtype=torch.int64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"cannot cluster a {tuple(w.shape)} weight with NaN or infinite entries")
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.float32), codes.reshape(w.shape)
    order = torch.argsort(x, stable=True)
    s = x[order]  # [n] sorted kept weights
    n = len(s)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s, 0)])  # [n + 1]
    centroids = torch.linspace(float(s[0]), float(s[-1]), min(2**bits, n), dtype=torch.float64)
    for _ in range(KMEANS_MAX_ITERATIONS):
        # cluster j holds the sorted weights in [bounds[j], bounds[j + 1]): a weight on a
        # midpoint goes to the upper cluster
        split = torch.searchsorted(s, (centroids[1:] + centroids[:-1]) / 2)  # [k - 1]
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), split, torch.tensor([n])])
        counts = bounds[1:] - bounds[:-1]  # [k]
        means = (prefix[bounds[1:]] - prefix[bounds[:-1]]) / counts.clamp(min=1)
        # an empty cluster keeps its centroid: it lies between its neighbours' new means, so the
        # centroids stay sorted and the runs stay contiguous
        updated = torch.where(counts > 0, means, centroids)
        if torch.equal(updated, centroids):
            break
        centroids = updated
    used = counts > 0
    codes[index[order]] = torch.repeat_interleave(torch.arange(int(used.sum())), counts[used])
    return means[used].to(torch.float32), codes.reshape(w.shape)


def shared_codes(
    w: torch.Tensor, bits: int, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook, codes) as `kmeans_clusters` gives them, for weights not yet shared.

    A weight whose kept entries already take at most 2^bits distinct values (float32) is shared
    already, by a fine-tuning that kept each cluster on one value: its codebook is those values,
    ascending, and nothing is clustered again (k-means of already shared values could merge two
    of them). So `share_weight` is idempotent, and the stored codebook is exactly what was trained.
    """
    kept = _kept(mask, w)
    w32 = w.detach().to("cpu", torch.float32)
    values = w32[kept.cpu()]
    if bool(torch.isfinite(values).all()):
        distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
        if len(distinct) <= 2**bits:
            codes = torch.full(w.shape, -1, dtype=torch.int64)
            codes[kept.cpu()] = inverse
            return distinct, codes
    return kmeans_clusters(w, bits, mask)


def share_weight(w: torch.Tensor, bits: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weight with every kept entry replaced by its cluster's shared value, zeros
    where mask == 0 (the weights `encode` stores for a "kmeans<bits>" kind)."""
    codebook, codes = shared_codes(w, bits, mask)
    return _from_codebook(codebook, codes)


def _from_codebook(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(codes.shape, dtype=torch.float32)
    kept = codes >= 0
    out[kept] = codebook[codes[kept]]
    return out


def cluster_mean(w: torch.Tensor, index: torch.Tensor, codes: torch.Tensor,
                 counts: torch.Tensor) -> torch.Tensor:
    """Each kept weight replaced by the mean of its cluster's current weights, in w's dtype.

    index: int64 [nnz] flat positions of the kept weights; codes: int64 [nnz] their clusters;
    counts: float32 [k] cluster sizes. Zeros elsewhere. The mean is differentiable: every weight
    of cluster c receives (1 / |c|) * sum of the output's gradient over c, Deep Compression's
    shared-weight gradient divided by the cluster's size. With plain SGD the weights of a cluster
    would then move together; Adam's per-weight state does not keep them together, which is why
    the weights are set back to their cluster means after each step (trainers.quantize).
    The sums run in float32 whatever w's dtype.
    """
    kept = w.reshape(-1).index_select(0, index).float()  # [nnz]
    sums = torch.zeros(len(counts), dtype=torch.float32, device=w.device).index_add(0, codes, kept)
    means = sums / counts  # [k]
    flat = torch.zeros(w.numel(), dtype=torch.float32, device=w.device)
    return flat.index_copy(0, index, means.index_select(0, codes)).reshape(w.shape).to(w.dtype)


# ------------------------------------------------------------------------------------ storage


def _pack_values(values: torch.Tensor, kind: str) -> torch.Tensor:
    """The stored values (1-D, kept positions only) in the kind's compact form."""
    if kind == "fp32":
        return values.to(torch.float32).contiguous()
    if kind == "int8":
        return values.to(torch.int8).contiguous()
    if kind in SHARED:
        # cluster indices in `bits` bits each, first value in the lowest bits of the first byte
        codes = values.numpy().astype(np.uint8)
        planes = np.unpackbits(codes[:, None], axis=1, bitorder="little")[:, : SHARED[kind]]
        return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))
    codes = values.numpy().astype(np.int8)
    if kind == "binary":
        return torch.from_numpy(np.packbits(codes > 0))
    # ternary: -1, 0, +1 stored as 0, 1, 2 in two bits, four to a byte, first value lowest
    twos = (codes + 1).astype(np.uint8)
    twos = np.concatenate([twos, np.ones(-len(twos) % 4, dtype=np.uint8)]).reshape(-1, 4)
    packed = twos[:, 0] | (twos[:, 1] << 2) | (twos[:, 2] << 4) | (twos[:, 3] << 6)
    return torch.from_numpy(np.ascontiguousarray(packed, dtype=np.uint8))


def _unpack_values(packed: torch.Tensor, kind: str, count: int) -> torch.Tensor:
    """Inverse of _pack_values: float32 values for fp32, int64 cluster indices for weight
    sharing, int8 codes otherwise."""
    if kind in ("fp32", "int8"):
        if packed.numel() != count:
            raise ValueError(f"expected {count} stored values, found {packed.numel()}")
        return packed.to(torch.float32 if kind == "fp32" else torch.int8).reshape(-1)
    raw = packed.numpy().astype(np.uint8).reshape(-1)
    if kind in SHARED:
        bits = SHARED[kind]
        if raw.size != math.ceil(count * bits / 8):
            raise ValueError(f"{raw.size} bytes cannot hold {count} {bits}-bit codes")
        planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
        codes = np.packbits(planes, axis=1, bitorder="little").reshape(-1)  # [count] uint8
        return torch.from_numpy(codes.astype(np.int64))
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
    * for the weight-sharing kinds "kmeans<b>" instead: "values" holds each kept weight's cluster
      index in b bits (ceil(n * b / 8) bytes, the first index in the lowest bits of the first
      byte), and "codebook" the shared values, float32 ascending, at most 2^b of them, as
      `shared_codes` gives them;
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
    None), nnz (kept positions: all of them when dense) and bytes (of all the tensors); for
    weight sharing also bits and codebook (its length).
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
    elif kind in SHARED:
        codebook, codes = shared_codes(w32, SHARED[kind], kept)
        flat = codes.reshape(-1)
        tensors["codebook"] = codebook.contiguous()
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
    if kind in SHARED:
        info.update(bits=SHARED[kind], codebook=int(tensors["codebook"].numel()))
    return tensors, info


def decode(tensors: dict[str, torch.Tensor], info: dict) -> torch.Tensor:
    """Inverse of `encode`: the float32 tensor.

    Exactly w * mask for fp32, dequantize(*quantize_weight(w, kind, mask)) for the quantized
    kinds and share_weight(w, bits, mask) for weight sharing, with the mask `encode` used (none
    when dense).
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
        # -1: no cluster, for weight sharing; the other kinds' codes and values are 0 there
        flat = torch.full((numel,), -1 if kind in SHARED else 0, dtype=values.dtype)
        flat[torch.from_numpy(index)] = values
    out = flat.reshape(shape)
    if kind in SHARED:
        codebook = tensors["codebook"].cpu().to(torch.float32).reshape(-1)
        if len(codebook) > 2 ** SHARED[kind] or (nnz and int(values.max()) >= len(codebook)):
            raise ValueError(f"codes do not fit a codebook of {len(codebook)} {kind} values")
        return _from_codebook(codebook, out)
    return out.to(torch.float32) if kind == "fp32" else dequantize(out, tensors["scale"].cpu())


def encoded_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Total bytes of the tensors' data."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
