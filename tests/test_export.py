"""Quantization runtimes, structured pruning and the compact model file, in-process (no Ray)."""

from __future__ import annotations

import json
import math
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from specs.job import KMeansBits, LeNet5Model, MLPModel
from trainers.export import (
    ExportFormatError, dense_file, load_compressed, read_compressed, write_compressed,
)
from trainers.models import architecture, build_from_architecture, count_params
from trainers.pruning import GlobalMagnitudePruner
from trainers.quantize import (
    calibrate_static, dynamic_int8, enable_fake_quant, layer_kinds, quantize_state, static_int8,
    weight_kinds,
)
from trainers.structured import channel_groups, channel_masks, shrink

IMAGE = (1, 28, 28)


def _mlp(seed=0):
    torch.manual_seed(seed)
    arch = architecture(MLPModel(kind="mlp", hidden=[300, 100]), IMAGE, 10)
    return arch, build_from_architecture(arch).eval()


def _pruned_state(model, sparsity):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = {k: v for k, v in state.items() if k.endswith(".weight")}
    masks, _ = GlobalMagnitudePruner.compute_masks(weights, sparsity)
    for k, m in masks.items():
        state[k] = state[k] * m
    return state, masks


def test_int8_sparse_file_is_ten_times_smaller_and_reloads_to_same_predictions(tmp_path):
    arch, model = _mlp()
    state, masks = _pruned_state(model, 0.9)
    kinds = layer_kinds(model, "dynamic")
    q_state = quantize_state(state, kinds, masks)
    q_model = build_from_architecture(arch)
    q_model.load_state_dict(q_state)
    runtime = dynamic_int8(q_model.eval())
    path = tmp_path / "m.safetensors"
    write_compressed(path, arch=arch, state=q_state, masks=masks, kinds=weight_kinds(kinds),
                     runtime="int8_dynamic", manifest={"method": "test"})
    dense_bytes = dense_file(tmp_path / "dense.safetensors", model.state_dict())
    assert dense_bytes / path.stat().st_size >= 10.0

    loaded, meta = load_compressed(path)
    x = torch.randn(512, *IMAGE)
    with torch.no_grad():
        expected, got = runtime(x), loaded(x)
    assert torch.equal(expected.argmax(-1), got.argmax(-1))
    assert torch.allclose(expected, got)
    assert meta["manifest"] == {"method": "test"} and meta["runtime"] == "int8_dynamic"
    # the int8 runtime really runs int8 kernels, and is close to the fp32 model it came from
    assert any("quantized" in type(m).__module__ for m in loaded.modules())
    with torch.no_grad():
        fp32 = q_model(x)
    assert (fp32.argmax(-1) == got.argmax(-1)).float().mean() > 0.95


def test_binary_weights_take_one_bit_each(tmp_path):
    arch, model = _mlp(1)
    kinds = layer_kinds(model, "binary")
    assert kinds == {"net.0": "int8", "net.2": "binary", "net.4": "int8"}  # first/last stay int8
    q_state = quantize_state(model.state_dict(), kinds, {})
    path = tmp_path / "b.safetensors"
    write_compressed(path, arch=arch, state=q_state, masks={}, kinds=weight_kinds(kinds),
                     runtime="int8_dynamic", manifest={}, entropy_coding=False)
    with safe_open(str(path), framework="pt") as f:
        parts = {k: f.get_tensor(k) for k in f.keys() if k.startswith("net.2.weight:")}
    n = 100 * 300
    codes = [t for k, t in parts.items() if t.dtype == torch.uint8 and t.numel() == math.ceil(n / 8)]
    assert len(codes) == 1, {k: (t.dtype, t.numel()) for k, t in parts.items()}
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    assert stored <= math.ceil(n / 8) + 100 * 4  # the bits and one fp32 scale per row
    w = q_state["net.2.weight"]
    assert all(len(torch.unique(row.abs())) == 1 for row in w)  # +-scale per output channel
    loaded, _ = load_compressed(path)
    x = torch.randn(64, *IMAGE)
    q_model = build_from_architecture(arch)
    q_model.load_state_dict(q_state)
    with torch.no_grad():
        assert torch.equal(dynamic_int8(q_model.eval())(x).argmax(-1), loaded(x).argmax(-1))


def test_static_int8_runs_quantized_conv_and_reloads_exactly(tmp_path):
    torch.manual_seed(2)
    arch = architecture(LeNet5Model(kind="lenet5", padding=2), (1, 8, 8), 10)
    model = build_from_architecture(arch).eval()
    kinds = layer_kinds(model, "static")
    q_state = quantize_state(model.state_dict(), kinds, {})
    q_float = build_from_architecture(arch)
    q_float.load_state_dict(q_state)
    calib = torch.randn(128, 1, 8, 8)
    ranges = calibrate_static(q_float.eval(), calib)
    assert ranges and all(r[0] <= r[1] for r in ranges.values())
    runtime = static_int8(q_float, ranges, (1, 8, 8))
    path = tmp_path / "s.safetensors"
    write_compressed(path, arch=arch, state=q_state, masks={}, kinds=weight_kinds(kinds),
                     runtime="int8_static", manifest={}, act_ranges=ranges)
    loaded, _ = load_compressed(path)
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(runtime(x), loaded(x))
        agree = (loaded(x).argmax(-1) == q_float(x).argmax(-1)).float().mean()
    assert agree > 0.9
    assert any(type(m).__name__ == "Conv2d" and "quantized" in type(m).__module__
               for m in loaded.modules())


def test_fake_quant_forward_equals_quantized_weights():
    arch, model = _mlp(3)
    state, masks = _pruned_state(model, 0.5)
    model.load_state_dict(state)
    kinds = layer_kinds(model, "ternary")
    reference = build_from_architecture(arch).eval()
    reference.load_state_dict(quantize_state(state, kinds, masks))
    enable_fake_quant(model, kinds, masks)
    x = torch.randn(32, *IMAGE)
    out = model(x)
    assert torch.allclose(out, reference(x), atol=1e-5)
    out.sum().backward()  # straight-through: every weight gets a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert set(model.state_dict()) == set(reference.state_dict())  # same names: DeepSpeed-safe


def _reads(group):
    """(root, the layer reading its channels, positions per channel there): each channel c is
    read at `block` consecutive positions c * block ... c * block + block - 1."""
    (reader,) = [s for s in group.slices if s.role == "in"]
    block = len(reader.index) // group.channels
    assert reader.dim == 1 and reader.index == tuple(range(group.channels * block))
    assert reader.channel == tuple(c for c in range(group.channels) for _ in range(block))
    return group.root, reader.parameter.removesuffix(".weight"), block


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_structured_pruning_removes_channels_without_changing_outputs(scope):
    torch.manual_seed(4)
    arch = architecture(LeNet5Model(kind="lenet5", padding=2), (1, 8, 8), 10)
    model = build_from_architecture(arch).eval()
    example = torch.zeros(2, 1, 8, 8)
    groups = channel_groups(model, example, 10)
    assert [_reads(g) for g in groups] == [
        ("features.0", "features.2", 1), ("features.2", "classifier.0", 4),
        ("classifier.0", "classifier.2", 1)]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    masks, kept = channel_masks(state, groups, 0.5, norm="l2", scope=scope)
    if scope == "global":
        assert sum(int((~k).sum()) for k in kept.values()) == round(0.5 * (20 + 50 + 500))
    else:
        assert [int(kept[g.root].sum()) for g in groups] == [10, 25, 250]
    masked = {k: v * masks[k] for k, v in state.items()}
    model.load_state_dict(masked)
    small, shapes = shrink(model, masks, example)
    small_arch = {**arch, "module_shapes": shapes}
    rebuilt = build_from_architecture(small_arch).eval()
    rebuilt.load_state_dict(small.state_dict())  # strict: every key, every shape
    widths = [shapes["features.0"]["out_channels"], shapes["features.2"]["out_channels"],
              shapes["classifier.0"]["out_features"]]
    assert widths == [int(kept[g.root].sum()) for g in groups]
    assert count_params(rebuilt) < 0.6 * count_params(model)
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), rebuilt(x), atol=1e-5)
    # a second round keeps the first round's channels pruned
    masks2, kept2 = channel_masks(masked, groups, 0.7, norm="l2", scope=scope, previous=masks)
    assert all(bool((kept2[n] <= kept[n]).all()) for n in kept)


def test_entropy_coding_shrinks_sparse_int8_and_decodes_exactly(tmp_path):
    arch, model = _mlp(5)
    state, masks = _pruned_state(model, 0.95)
    kinds = layer_kinds(model, "dynamic")
    q_state = quantize_state(state, kinds, masks)
    sizes, states = {}, {}
    for entropy in (False, True):
        path = tmp_path / f"e{entropy}.safetensors"
        layout = write_compressed(path, arch=arch, state=q_state, masks=masks,
                                  kinds=weight_kinds(kinds), runtime="int8_dynamic", manifest={},
                                  entropy_coding=entropy)
        sizes[entropy] = path.stat().st_size
        states[entropy] = read_compressed(path)[1]
    assert layout["net.0.weight"]["deflated"]  # the big layer's codes and gaps deflate
    assert sizes[True] < 0.9 * sizes[False]
    assert all(torch.equal(states[True][k], states[False][k]) for k in states[False])
    assert all(torch.equal(states[True][k], q_state[k]) for k in q_state)


def test_kmeans_file_holds_codebooks_and_reloads_exactly(tmp_path):
    """LeNet-300-100 at 92% sparsity with 5-bit weight sharing: per layer at most 32 shared
    values, b-bit codes and 8-bit relative indices, deflated where that is smaller; the fp32
    runtime reloads to the very same outputs; the file is smaller than the int8 one."""
    arch, model = _mlp(6)
    state, masks = _pruned_state(model, 0.92)
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=5))
    q_state = quantize_state(state, kinds, masks)
    q_model = build_from_architecture(arch).eval()
    q_model.load_state_dict(q_state)
    path = tmp_path / "k.safetensors"
    layout = write_compressed(path, arch=arch, state=q_state, masks=masks,
                              kinds=weight_kinds(kinds), runtime="fp32", manifest={"bits": 5})
    meta, decoded, _, _ = read_compressed(path)
    assert all(torch.equal(decoded[k], q_state[k]) for k in q_state)
    loaded, _ = load_compressed(path)
    x = torch.randn(256, *IMAGE)
    with torch.no_grad():
        assert torch.equal(loaded(x), q_model(x))  # same fp32 weights, same kernels: bit for bit
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    for name in ("net.0.weight", "net.2.weight", "net.4.weight"):
        info = layout[name]
        assert info["kind"] == "kmeans5" and info["bits"] == 5 and info["codebook"] <= 32
        w = decoded[name]
        assert len(torch.unique(w[masks[name]])) <= 32 and torch.all(w[~masks[name]] == 0)
        assert stored[f"{name}:codebook"].numel() == info["codebook"]
        nnz = int(masks[name].sum())
        # each part deflated exactly when deflate made it smaller (and it was worth a stream)
        for part, size in (("values", math.ceil(nnz * 5 / 8)), ("positions", None)):
            if part in info["deflated"]:
                assert stored[f"{name}:{part}.z"].numel() < math.prod(
                    info["deflated"][part]["shape"])
            else:
                raw = stored[f"{name}:{part}"]
                assert size is None or raw.numel() == size
                z = zlib.compressobj(9, zlib.DEFLATED, -15)  # raw deflate, as the writer's
                deflated = len(z.compress(raw.numpy().tobytes()) + z.flush())
                assert raw.numel() < 256 or deflated >= raw.numel()
    assert layout["net.0.weight"]["deflated"]  # the big layer's gaps deflate
    assert meta["runtime"] == "fp32" and meta["manifest"] == {"bits": 5}

    int8_kinds = layer_kinds(model, "dynamic")
    int8 = tmp_path / "i.safetensors"
    write_compressed(int8, arch=arch, state=quantize_state(state, int8_kinds, masks), masks=masks,
                     kinds=weight_kinds(int8_kinds), runtime="int8_dynamic", manifest={"bits": 8})
    # same positions; 5-bit codes and 32 floats per layer instead of int8 codes and a float per
    # output channel
    assert path.stat().st_size < 0.85 * int8.stat().st_size


def test_kmeans_of_lenet5_gives_conv_and_linear_layers_their_bits(tmp_path):
    torch.manual_seed(7)
    arch = architecture(LeNet5Model(kind="lenet5", padding=2), (1, 8, 8), 10)
    model = build_from_architecture(arch).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=4, conv=6))
    q_state = quantize_state(state, kinds, {})  # unpruned: every weight is in a cluster
    path = tmp_path / "l.safetensors"
    layout = write_compressed(path, arch=arch, state=q_state, masks={},
                              kinds=weight_kinds(kinds), runtime="fp32", manifest={})
    for name, bits in (("features.0.weight", 6), ("features.2.weight", 6),
                       ("classifier.0.weight", 4), ("classifier.2.weight", 4)):
        assert layout[name]["bits"] == bits and not layout[name]["sparse"]
        assert len(torch.unique(q_state[name])) <= 2**bits
    assert layout["features.0.bias"]["kind"] == "fp32"  # biases stay fp32
    loaded, _ = load_compressed(path)
    reference = build_from_architecture(arch).eval()
    reference.load_state_dict(q_state)
    x = torch.randn(64, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_bad_files_are_refused_with_a_clear_error(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ExportFormatError, match="not a safetensors file"):
        load_compressed(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ExportFormatError, match="not a stillhouse compressed model"):
        load_compressed(plain)
    arch, model = _mlp()
    good = tmp_path / "good.safetensors"
    write_compressed(good, arch=arch, state=model.state_dict(), masks={}, kinds={},
                     runtime="fp32", manifest={})
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["net.0.weight:values"] = tensors["net.0.weight:values"][:10]  # truncated tensor
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ExportFormatError, match="net.0.weight"):
        load_compressed(bad)
    assert json.loads(meta["architecture"]) == arch
    with pytest.raises(ExportFormatError, match="no such file"):
        load_compressed(tmp_path / "missing.safetensors")


def test_the_header_is_canonical_whatever_order_safetensors_wrote(tmp_path):
    """safetensors writes metadata keys in a per-process random order; the compact file's header
    is rewritten sorted, so the same content is the same bytes, and it still loads."""
    import json

    from safetensors.torch import load_file, save_file

    from trainers.export import canonical_header_

    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    metadata = {"runtime": "fp32", "architecture": json.dumps({"kind": "mlp"}), "layout": "{}"}
    paths = []
    for i, order in enumerate([list(metadata), list(reversed(metadata))]):
        path = tmp_path / f"{i}.safetensors"
        save_file(tensors, str(path), metadata={k: metadata[k] for k in order})
        canonical_header_(path)
        paths.append(path)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    size = int.from_bytes(paths[0].read_bytes()[:8], "little")
    assert list(json.loads(paths[0].read_bytes()[8:8 + size])["__metadata__"]) == sorted(metadata)
    loaded = load_file(str(paths[0]))
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
