"""The weight codecs: quantizers, straight-through fake quantization and compact storage."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load, save

from trainers.codec import (
    BITS,
    KINDS,
    cluster_mean,
    decode,
    dequantize,
    encode,
    encoded_bytes,
    fake_quantize,
    kmeans_clusters,
    kmeans_kind,
    quantize_weight,
    share_weight,
    shared_codes,
)

QUANTIZED = ("int8", "ternary", "binary")


def reference(w: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    """What decode(*encode(w, kind, mask)) must give, computed without the storage layer."""
    if kind == "fp32":
        w32 = w.float()
        return w32 if mask is None else w32 * (mask != 0)
    return dequantize(*quantize_weight(w, kind, mask))


def effective_mask(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    if mask is not None:
        return mask
    return w != 0 if 2 * int((w == 0).sum()) > w.numel() else None


def gap_entries(kept: np.ndarray) -> int:
    """Length of the gap encoding, counted one kept position at a time."""
    entries, prev = 0, -1
    for p in np.flatnonzero(kept.reshape(-1)):
        entries += 1 + (p - prev - 1) // 255
        prev = p
    return entries


def check_round_trip(w: torch.Tensor, kind: str, mask: torch.Tensor | None) -> tuple[dict, dict]:
    tensors, info = encode(w, kind, mask)
    out = decode(tensors, info)
    expected = reference(w, kind, effective_mask(w, mask))
    assert out.dtype == torch.float32
    assert out.shape == w.shape
    assert torch.equal(out, expected)
    assert json.loads(json.dumps(info)) == info
    assert info["bytes"] == encoded_bytes(tensors)
    assert info["shape"] == list(w.shape) and info["kind"] == kind
    assert all(t.is_contiguous() for t in tensors.values())
    used = effective_mask(w, mask)
    assert info["sparse"] == (used is not None)
    if used is not None:
        assert info["nnz"] == int((used != 0).sum())
        assert torch.all(out[used == 0] == 0)
    else:
        assert info["positions"] is None and "positions" not in tensors
    return tensors, info


# ------------------------------------------------------------------------- round trips


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4)


@settings(max_examples=120, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    shape=shapes,
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    keep=st.sampled_from([None, 0.0, 0.01, 0.3, 0.5, 0.9, 1.0]),
    zeros=st.sampled_from([0.0, 0.4, 0.8]),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip_matches_reference(kind, shape, dtype, keep, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 3
    w[torch.rand(shape, generator=g) < zeros] = 0.0
    w = w.to(dtype)
    mask = None if keep is None else torch.rand(shape, generator=g) < keep
    check_round_trip(w, kind, mask)


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 4),
    data=st.data(),
    masked=st.booleans(),
)
def test_round_trip_arbitrary_floats(kind, rows, data, masked):
    """Hypothesis' own floats: subnormals, exact halves, huge and tiny magnitudes, signed zeros."""
    cols = data.draw(st.integers(1, 12))
    values = data.draw(
        st.lists(
            st.floats(allow_nan=False, allow_infinity=False, width=32),
            min_size=rows * cols,
            max_size=rows * cols,
        )
    )
    w = torch.tensor(values, dtype=torch.float32).reshape(rows, cols)
    mask = None
    if masked:
        bits = data.draw(st.lists(st.booleans(), min_size=rows * cols, max_size=rows * cols))
        mask = torch.tensor(bits).reshape(rows, cols)
    check_round_trip(w, kind, mask)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 3, 5, 5), (13,), (3, 37)])
def test_conv_bias_and_odd_sizes_round_trip(kind, shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    check_round_trip(w, kind, None)
    check_round_trip(w, kind, torch.rand(shape, generator=g) < 0.4)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask(kind):
    w = torch.randn(6, 50)
    tensors, info = check_round_trip(w, kind, torch.zeros(6, 50, dtype=torch.bool))
    assert info["nnz"] == 0
    assert torch.equal(decode(tensors, info), torch.zeros(6, 50))
    assert info["positions"] == "gaps" and tensors["positions"].numel() == 0
    assert tensors["values"].numel() == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(0, 5), (5, 0), (0,)])
def test_zero_size_tensors(kind, shape):
    check_round_trip(torch.zeros(shape), kind, None)
    check_round_trip(torch.zeros(shape), kind, torch.zeros(shape))


def test_scalar_needs_fp32():
    w = torch.tensor(2.5)
    check_round_trip(w, "fp32", None)
    for kind in QUANTIZED:
        with pytest.raises(ValueError):
            encode(w, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_input(kind):
    w = (torch.randn(8, 17) * 5).to(torch.bfloat16)
    out = decode(*encode(w, kind))
    if kind == "fp32":
        assert torch.equal(out, w.float())
    else:
        assert torch.equal(out, dequantize(*quantize_weight(w.float(), kind)))


@pytest.mark.parametrize("kind", KINDS)
def test_safetensors_round_trip(kind):
    w = torch.randn(20, 30)
    for mask in (None, torch.rand(20, 30) < 0.5, torch.rand(20, 30) < 0.01):
        tensors, info = encode(w, kind, mask)
        blob = save({f"fc1.weight.{k}": v for k, v in tensors.items()})
        back = {k.removeprefix("fc1.weight."): v for k, v in load(blob).items()}
        assert torch.equal(decode(back, json.loads(json.dumps(info))), decode(tensors, info))


# ----------------------------------------------------------------------------- positions


def test_dense_when_at_most_half_zero():
    w = torch.arange(1.0, 11.0)
    w[:5] = 0
    assert encode(w, "fp32")[1]["sparse"] is False
    w[5] = 0
    tensors, info = encode(w, "fp32")
    assert info["sparse"] is True and info["nnz"] == 4
    assert torch.equal(decode(tensors, info), w)


@pytest.mark.parametrize("kind", KINDS)
def test_half_sparse_chooses_bitmap(kind):
    mask = torch.rand(100, 80, generator=torch.Generator().manual_seed(2)) < 0.5
    tensors, info = encode(torch.randn(100, 80), kind, mask)
    assert info["positions"] == "bitmap"
    assert tensors["positions"].dtype == torch.uint8
    assert tensors["positions"].numel() == 1000
    bits = np.unpackbits(tensors["positions"].numpy()).astype(bool)
    assert np.array_equal(bits, mask.reshape(-1).numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_very_sparse_chooses_gaps(kind):
    mask = torch.rand(100, 80, generator=torch.Generator().manual_seed(3)) < 0.01
    tensors, info = encode(torch.randn(100, 80), kind, mask)
    assert info["positions"] == "gaps"
    assert tensors["positions"].numel() == gap_entries(mask.numpy()) < 1000


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    keep=st.floats(0.0, 0.6),
    seed=st.integers(0, 2**31 - 1),
)
def test_positions_take_the_smaller_encoding(n, keep, seed):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < keep
    tensors, info = encode(torch.randn(n), "int8", mask)
    bitmap, gaps = math.ceil(n / 8), gap_entries(mask.numpy())
    assert info["positions"] == ("gaps" if gaps < bitmap else "bitmap")
    assert tensors["positions"].numel() == min(bitmap, gaps)


def test_gap_layout():
    """Distances from the previous kept position (the first from -1); a 0 byte skips 255."""
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[[0, 300, 999]] = True
    tensors, info = encode(torch.randn(1000), "fp32", mask)
    assert info["positions"] == "gaps"
    assert tensors["positions"].tolist() == [1, 0, 45, 0, 0, 189]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("spots", [[254], [255], [509], [510], [0, 255, 511, 4000], [3, 4, 2999]])
def test_gaps_over_255_round_trip(kind, spots):
    n = 5000
    w = torch.randn(n, generator=torch.Generator().manual_seed(4)) + 0.1
    mask = torch.zeros(n, dtype=torch.bool)
    mask[spots] = True
    tensors, info = check_round_trip(w.reshape(50, 100), kind, mask.reshape(50, 100))
    assert info["positions"] == "gaps"
    out = decode(tensors, info).reshape(-1)
    assert torch.count_nonzero(out[~mask]) == 0
    if kind == "fp32":
        assert torch.equal(out[mask], w[mask])
    if kind == "binary":  # every kept binary weight is +-scale
        assert torch.all(out[mask] != 0)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    distances=st.lists(st.integers(1, 1200), min_size=0, max_size=12),
    tail=st.integers(0, 700),
)
def test_any_gaps_round_trip(kind, distances, tail):
    spots = np.cumsum(distances) - 1
    n = int(spots[-1]) + 1 + tail if len(spots) else tail + 1
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.from_numpy(spots.astype(np.int64))] = True
    w = torch.randn(n, generator=torch.Generator().manual_seed(n))
    check_round_trip(w, kind, mask)


# ---------------------------------------------------------------------------------- sizes


def test_sparse_int8_is_under_a_tenth_of_dense_fp32():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 784, generator=g)
    mask = torch.rand(300, 784, generator=g) >= 0.9
    dense = encode(w, "fp32")[1]["bytes"]
    assert dense == 300 * 784 * 4
    tensors, info = encode(w, "int8", mask)
    assert info["bytes"] < dense / 10
    assert tensors["values"].numel() == int(mask.sum())
    assert tensors["scale"].numel() == 300


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(7, 13), (5, 3, 3, 3), (8, 8), (1,), (2, 3)])
def test_dense_value_bytes(kind, shape):
    n = math.prod(shape)
    w = torch.randn(shape) + 0.01
    tensors, info = encode(w, kind)
    values = tensors["values"]
    assert values.numel() * values.element_size() == math.ceil(n * BITS[kind] / 8)
    assert info["nnz"] == n
    if kind != "fp32":
        assert tensors["scale"].dtype == torch.float32 and tensors["scale"].numel() == shape[0]
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())


def test_packed_layouts():
    w = torch.tensor([[-1.0, 0.0, 1.0, 1.0, -1.0, 2.0, -3.0, 0.5, -0.5]])
    binary = encode(w, "binary")[0]["values"]
    assert binary.tolist() == [0b01110101, 0b00000000]  # w >= 0 is 1; first value highest bit
    w = torch.tensor([[-1.0, 0.1, 1.0, 1.0, -1.0]])  # delta 0.7 * 0.82 keeps all but 0.1
    ternary = encode(w, "ternary")[0]["values"]
    assert ternary.numel() == 2
    assert ternary[0].item() == 0 | 1 << 2 | 2 << 4 | 2 << 6  # -1, 0, +1 as 0, 1, 2; first lowest


# ------------------------------------------------------------------------------ quantizers


def test_int8_codes_and_scale():
    w = torch.tensor([[1.27, -0.5, 0.0, 0.0], [127.0, 1.5, 2.5, -0.7], [0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_weight(w, "int8")
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.allclose(scale, torch.tensor([0.01, 1.0, 1.0]))
    assert codes.tolist() == [[127, -50, 0, 0], [127, 2, 2, -1], [0, 0, 0, 0]]  # halves to even


def test_binary_codes_and_scale():
    codes, scale = quantize_weight(torch.tensor([[1.0, -3.0, 0.0], [-2.0, -2.0, 4.0]]), "binary")
    assert codes.tolist() == [[1, -1, 1], [-1, -1, 1]]
    assert torch.allclose(scale, torch.tensor([4 / 3, 8 / 3]))


def test_ternary_codes_and_scale():
    w = torch.tensor([[1.0, -0.1, -2.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    codes, scale = quantize_weight(w, "ternary")  # delta = 0.7 * 0.775
    assert codes.tolist() == [[1, 0, -1, 0], [0, 0, 0, 0]]
    assert torch.allclose(scale, torch.tensor([1.5, 1.0]))


@pytest.mark.parametrize("kind", QUANTIZED)
def test_masked_entries_ignored_by_scale(kind):
    w = torch.tensor([[100.0, 1.0, -1.0], [5.0, 6.0, 7.0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 0]])
    codes, scale = quantize_weight(w, kind, mask)
    assert codes[0, 0] == 0 and torch.all(codes[1] == 0)
    assert scale[1] == 1.0
    unmasked = quantize_weight(w[:1, 1:], kind)
    assert torch.equal(scale[:1], unmasked[1])
    assert torch.equal(codes[:1, 1:], unmasked[0])


def test_conv_scales_are_per_output_channel():
    w = torch.randn(4, 3, 3, 3)
    w[2] *= 100
    codes, scale = quantize_weight(w, "int8")
    assert codes.shape == w.shape
    assert torch.allclose(scale, w.abs().amax(dim=(1, 2, 3)) / 127)
    assert torch.all(codes.abs().amax(dim=(1, 2, 3)) == 127)


def test_bias_scales_per_element():
    w = torch.tensor([0.5, -2.0, 0.0])
    codes, scale = quantize_weight(w, "int8")
    assert codes.tolist() == [127, -127, 0]
    assert torch.allclose(dequantize(codes, scale), w)


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(3, 3), "fp32")
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(3, 3), "int4")
    with pytest.raises(ValueError):
        quantize_weight(torch.randn(3, 3), "int8", torch.ones(3, 4))
    with pytest.raises(ValueError):
        encode(torch.randn(3), "int4")


@pytest.mark.parametrize("kind", QUANTIZED)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_show_in_their_channel(kind, bad):
    w = torch.tensor([[1.0, bad, -2.0], [1.0, 2.0, -3.0]], requires_grad=True)
    codes, scale = quantize_weight(w, kind)
    assert torch.isnan(scale[0]) and torch.all(codes[0] == 0)
    assert torch.equal(scale[1:], quantize_weight(w[1:], kind)[1])
    out = fake_quantize(w, kind)  # no raise: the NaN must reach the loss
    assert torch.all(torch.isnan(out[0])) and torch.all(torch.isfinite(out[1]))
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    assert torch.all(torch.isfinite(dequantize(*quantize_weight(w, kind, mask))))


@pytest.mark.parametrize("kind", KINDS)
def test_encode_refuses_non_finite_kept_values(kind):
    w = torch.tensor([[1.0, math.nan, -2.0], [1.0, 2.0, -3.0]])
    with pytest.raises(ValueError):
        encode(w, kind)
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    out = decode(*encode(w, kind, mask))
    assert out[0, 1] == 0 and torch.all(torch.isfinite(out))


def test_decode_rejects_inconsistent_info():
    tensors, info = encode(torch.randn(4, 4), "int8", torch.rand(4, 4) < 0.5)
    with pytest.raises(ValueError):
        decode(tensors, {**info, "nnz": info["nnz"] + 1})
    tensors, info = encode(torch.randn(4, 4), "binary")
    with pytest.raises(ValueError):
        decode(tensors, {**info, "shape": [4, 5]})


# -------------------------------------------------------------------------- fake quantize


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(QUANTIZED),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    masked=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_fake_quantize_forward_and_straight_through_gradient(kind, dtype, masked, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(6, 11, generator=g) * 10 ** torch.randn(6, 1, generator=g)
    w = base.to(dtype).requires_grad_()
    mask = torch.rand(6, 11, generator=g) < 0.5 if masked else None
    out = fake_quantize(w, kind, mask)
    assert out.dtype == dtype
    assert torch.equal(out.detach(), dequantize(*quantize_weight(w.detach(), kind, mask)).to(dtype))
    upstream = torch.randn(6, 11, generator=g).to(dtype)
    (out * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


# ------------------------------------------------------------------------- weight sharing


def _sparse_weight(shape, keep, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.1
    mask = torch.rand(shape, generator=g) < keep if keep is not None else None
    return w, mask


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(1, 8),
    shape=shapes,
    keep=st.sampled_from([None, 0.0, 0.05, 0.3, 0.9]),
    zeros=st.sampled_from([0.0, 0.7]),
    seed=st.integers(0, 2**31 - 1),
)
def test_shared_weights_round_trip_exactly(bits, shape, keep, zeros, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 3
    w[torch.rand(shape, generator=g) < zeros] = 0.0
    mask = None if keep is None else torch.rand(shape, generator=g) < keep
    kind = kmeans_kind(bits)
    tensors, info = encode(w, kind, mask)
    out = decode(tensors, info)
    used = effective_mask(w, mask)
    # bits must match: the file holds the very values the shared model computes with
    assert torch.equal(out, share_weight(w, bits, used))
    assert torch.equal(share_weight(out, bits, used), out)  # shared weights stay as they are
    kept = torch.ones(shape, dtype=torch.bool) if used is None else used != 0
    assert torch.all(out[~kept] == 0)  # pruned weights: exactly zero, in no cluster
    codebook = tensors["codebook"]
    assert codebook.dtype == torch.float32 and len(codebook) <= 2**bits
    assert torch.equal(torch.unique(out[kept]), torch.unique(codebook)) or not kept.any()
    assert bool((codebook[1:] > codebook[:-1]).all())  # ascending, distinct
    nnz = int(kept.sum())
    assert info["nnz"] == nnz and info["bits"] == bits and info["codebook"] == len(codebook)
    assert tensors["values"].dtype == torch.uint8
    assert tensors["values"].numel() == math.ceil(nnz * bits / 8)  # b bits per kept weight
    assert info["bytes"] == encoded_bytes(tensors)
    assert json.loads(json.dumps(info)) == info
    assert info["sparse"] == (used is not None)


def test_kmeans_starts_linear_between_min_and_max_and_runs_lloyd():
    # one bit: centroids start at the min and max, 0.0 and 1.0; the midpoint 0.5 splits the
    # weights into {0, 0.1, 0.2} and {0.9, 1.0}, whose means are a fixed point
    w = torch.tensor([0.9, 0.0, 0.2, 1.0, 0.1])
    codebook, codes = kmeans_clusters(w, 1)
    # float64 means cast to float32; they may differ from the float32 literals by an ulp
    assert torch.allclose(codebook, torch.tensor([0.1, 0.95]), rtol=0, atol=1e-7)
    assert codes.tolist() == [1, 0, 0, 1, 0]
    # a few large weights keep a centroid of their own (why Deep Compression chose linear
    # initialisation): 2 bits over [-0.1, 3.0] put a centroid next to the outlier
    w = torch.cat([torch.linspace(-0.1, 0.1, 200), torch.tensor([3.0])])
    codebook, codes = kmeans_clusters(w, 2)
    assert codebook[-1] == 3.0 and int((codes == len(codebook) - 1).sum()) == 1


def test_pruned_weights_belong_to_no_cluster():
    w = torch.tensor([[5.0, 0.0, -0.3, 0.31], [0.29, -7.0, 0.0, -0.28]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 0, 0, 1]], dtype=torch.bool)
    codebook, codes = kmeans_clusters(w, 1, mask)
    assert torch.equal(codes < 0, ~mask)  # the big pruned weights do not pull any centroid
    assert float(codebook.min()) > -0.31 and float(codebook.max()) < 0.31
    out = share_weight(w, 1, mask)
    assert torch.all(out[~mask] == 0) and torch.all(out[mask] != 0)
    assert out[0, 1] == codebook[codes[0, 1]]  # a kept weight that is 0.0 is clustered too


def test_weights_shared_already_are_not_clustered_again():
    # four distinct values fit two bits; k-means from linear centroids (0, 1/3, 2/3, 1) would
    # merge 0, 0.01 and 0.02 into one cluster
    w = torch.tensor([0.0, 0.01, 0.02, 1.0, 0.01, 1.0])
    assert len(kmeans_clusters(w, 2)[0]) == 2
    codebook, codes = shared_codes(w, 2)
    assert codebook.tolist() == torch.tensor([0.0, 0.01, 0.02, 1.0]).tolist()
    assert torch.equal(share_weight(w, 2), w)
    assert torch.equal(decode(*encode(w, "kmeans2")), w)
    assert len(shared_codes(torch.tensor([0.0, 0.01, 0.02, 1.0, 0.5]), 2)[0]) <= 4  # 5: cluster


def test_shared_codes_pack_lowest_bit_first():
    w = torch.tensor([[1.0, 2.0, 7.0, 0.0, 3.0, 4.0, 5.0, 6.0]])  # 8 values: codes = the values
    tensors, info = encode(w, "kmeans3")
    assert tensors["codebook"].tolist() == list(range(8))
    # codes 1, 2, 7, 0, 3, 4, 5, 6 as 3 bits each, lowest first: 100 010 111 000 110 001 101 011
    stream = "100010111000110001101011"
    expected = [int(stream[i : i + 8][::-1], 2) for i in range(0, 24, 8)]
    assert tensors["values"].tolist() == expected == [0b11010001, 0b00110001, 0b11010110]
    assert torch.equal(decode(tensors, info), w)


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_weight_sharing_of_a_pruned_layer(bits):
    w, mask = _sparse_weight((300, 784), 0.08, seed=bits)
    tensors, info = encode(w, kmeans_kind(bits), mask)
    out = decode(tensors, info)
    assert len(torch.unique(out[mask])) <= 2**bits and torch.all(out[~mask] == 0)
    assert info["positions"] == "gaps"
    # Lloyd's fixed point: every kept weight went to its nearest shared value (1e-7: float32
    # rounding of equal distances on a midpoint)
    codebook = tensors["codebook"]
    nearest = (w[mask][:, None] - codebook[None, :]).abs().min(dim=1).values
    assert bool(((out[mask] - w[mask]).abs() <= nearest + 1e-7).all())
    fp32 = encode(w, "fp32", mask)[1]["bytes"]
    assert info["bytes"] < fp32 * (bits + 8 + 1) / 40  # b-bit codes + 8-bit gaps vs 32 + 8


def test_weight_sharing_rejects_bad_input():
    with pytest.raises(ValueError):
        kmeans_kind(9)
    with pytest.raises(ValueError):
        kmeans_clusters(torch.randn(4), 0)
    with pytest.raises(ValueError):
        kmeans_clusters(torch.tensor([1.0, math.nan]), 2)
    with pytest.raises(ValueError):
        encode(torch.tensor([[1.0, math.inf]]), "kmeans4")
    tensors, info = encode(torch.randn(4, 8), "kmeans2")
    with pytest.raises(ValueError):  # a code past the end of the codebook
        decode({**tensors, "codebook": tensors["codebook"][:1]}, info)
    with pytest.raises(ValueError):  # more shared values than 2^bits
        decode({**tensors, "codebook": torch.arange(5.0)}, info)
    with pytest.raises(ValueError):  # values truncated
        decode({**tensors, "values": tensors["values"][:-1]}, info)


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bits=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_cluster_mean_forward_and_averaged_gradient(dtype, bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(6, 11, generator=g)).to(dtype).requires_grad_()
    mask = torch.rand(6, 11, generator=g) < 0.6
    _, codes = kmeans_clusters(w.detach(), bits, mask)
    index = torch.nonzero(codes.reshape(-1) >= 0).reshape(-1)
    kept_codes = codes.reshape(-1)[index]
    counts = torch.bincount(kept_codes).float()
    out = cluster_mean(w, index, kept_codes, counts)
    assert out.dtype == dtype and torch.all(out.detach()[~mask] == 0)
    w32 = w.detach().float()
    for c in range(len(counts)):
        members = codes == c
        # float32 sums in another order than torch.mean: a tolerance of a few float32 ulps
        assert torch.allclose(out.detach()[members].float(), w32[members].mean().expand(
            int(members.sum())).to(dtype).float(), rtol=1e-5, atol=1e-6)
    upstream = torch.randn(6, 11, generator=g).to(dtype)
    (out * upstream).sum().backward()
    grad = w.grad.float()
    assert torch.all(grad[~mask] == 0)
    for c in range(len(counts)):
        members = codes == c
        expected = upstream.float()[members].sum() / members.sum()  # the averaged gradient
        tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16 gradients carry 8 mantissa bits
        assert torch.allclose(grad[members], expected.expand(int(members.sum())), rtol=tol, atol=tol)
