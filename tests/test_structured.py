"""Structured (channel) pruning through Torch-Pruning's dependency graph, on registry models with
residual sums, concatenations, depthwise convs, squeeze-excitation and BatchNorm (no Ray).

Float tolerance: a shrunk layer sums the same nonzero products as the masked one, but over fewer
terms, so the kernels block and order the sums differently; fp32 rounding of ~1e-7 per operation
grows over ~20 layers, and the outputs agree to `rtol=1e-4` with `atol` at 1e-5 of the largest
logit (randomly initialised models give logits of very different scales).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from trainers.models import MLP
from trainers.structured import (
    channel_groups, channel_masks, kept_channels, pruned_parameters, reshape_modules, shrink,
)

IMAGE = (3, 32, 32)


def _timm(name):
    import timm

    return lambda: timm.create_model(name, pretrained=False, num_classes=10, in_chans=3)


def _torchvision(name):
    import torchvision

    return lambda: torchvision.models.get_model(name, weights=None, num_classes=10)


MODELS = {
    "timm resnet18": _timm("resnet18"),
    "torchvision resnet18": _torchvision("resnet18"),
    "torchvision mobilenet_v3_small": _torchvision("mobilenet_v3_small"),
    "torchvision squeezenet1_1": _torchvision("squeezenet1_1"),  # concatenations, conv classifier
}


def _build(factory, seed=0):
    """A model in eval mode whose BatchNorm layers are not the identity (fresh ones are)."""
    torch.manual_seed(seed)
    model = factory().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _apply(model, masks):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _assert_same_logits(got, expected):
    scale = float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", list(MODELS))
def test_masked_model_equals_shrunk_model_and_reloads(name, scope):
    model = _build(MODELS[name])
    example = torch.zeros(2, *IMAGE)
    groups = channel_groups(model, example, 10)
    masks, kept = channel_masks(_params(model), groups, 0.5, norm="l2", scope=scope)
    total = sum(g.channels for g in groups)
    pruned = sum(int((~k).sum()) for k in kept.values())
    if scope == "layer":
        assert pruned == sum(min(g.channels - 1, round(0.5 * g.channels)) for g in groups)
    else:
        assert pruned == round(0.5 * total)
    _apply(model, masks)
    small, shapes = shrink(model, masks, example)
    assert _count(small) < 0.6 * _count(model)
    x = torch.randn(8, *IMAGE)
    with torch.no_grad():
        masked_out, small_out = model(x), small(x)
    assert small_out.shape == (8, 10)  # the classes are never pruned
    _assert_same_logits(small_out, masked_out)
    assert json.loads(json.dumps(shapes)) == shapes
    # the export's way back: the full model from the registry, resized, strict load, no pickle
    rebuilt = reshape_modules(_build(MODELS[name], seed=1), shapes)
    rebuilt.load_state_dict(small.state_dict(), strict=True)
    with torch.no_grad():
        # bits match: the same weights in the same shapes run through the same kernels
        assert torch.equal(rebuilt(x), small_out)


@pytest.mark.parametrize("name", ["timm resnet18", "torchvision resnet18"])
def test_residual_channels_are_pruned_together(name):
    model = _build(MODELS[name])
    example = torch.zeros(2, *IMAGE)
    groups = channel_groups(model, example, 10)
    by_producer = {layer: g for g in groups for layer in g.producers}
    # every layer that writes into layer1's residual stream (the stem and each block's last
    # conv) is one group, with the stem's BatchNorm and every reader of the stream
    stream = by_producer["conv1"]
    assert {"conv1", "layer1.0.conv2", "layer1.1.conv2"} <= set(stream.producers)
    params = set(stream.parameters)
    assert {"bn1.weight", "bn1.bias", "layer1.0.bn2.weight", "layer1.1.conv1.weight",
            "layer2.0.conv1.weight", "layer2.0.downsample.0.weight"} <= params
    down = by_producer["layer2.0.downsample.0"]
    assert {"layer2.0.conv2", "layer2.1.conv2"} <= set(down.producers)
    assert "fc" not in by_producer  # the logits
    masks, kept = channel_masks(_params(model), groups, 0.5, scope="layer")
    dead_rows = {layer: ~masks[f"{layer}.weight"].flatten(1).any(1)
                 for layer in ("conv1", "layer1.0.conv2", "layer1.1.conv2")}
    assert int(dead_rows["conv1"].sum()) == 32
    assert all(torch.equal(d, dead_rows["conv1"]) for d in dead_rows.values())
    _apply(model, masks)
    small, shapes = shrink(model, masks, example)
    widths = {shapes[n]["out_channels"] for n in ("conv1", "layer1.0.conv2", "layer1.1.conv2")}
    assert widths == {32} and shapes["bn1"] == {"num_features": 32}
    assert shapes["layer1.0.conv1"]["in_channels"] == 32
    assert shapes["fc"] == {"in_features": 256, "out_features": 10}
    with torch.no_grad():  # the sums still add tensors of one width
        assert small(torch.randn(2, *IMAGE)).shape == (2, 10)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_earlier_rounds_stay_pruned(scope):
    model = _build(MODELS["torchvision mobilenet_v3_small"])
    groups = channel_groups(model, torch.zeros(2, *IMAGE), 10)
    weights = _params(model)
    first, kept1 = channel_masks(weights, groups, 0.3, scope=scope)
    # pruned weights that are not exactly zero any more (bf16 rounding, say) and score highest
    revived = {n: torch.where(first[n], w, torch.full_like(w, 9.0)) for n, w in weights.items()}
    second, kept2 = channel_masks(revived, groups, 0.6, scope=scope, previous=first)
    for root in kept1:
        assert not (kept2[root] & ~kept1[root]).any(), root
    for n in weights:
        assert not (second[n] & ~first[n]).any(), n
    assert sum(int((~k).sum()) for k in kept2.values()) > sum(int((~k).sum()) for k in kept1.values())
    assert {r: torch.equal(k, kept_channels(second, groups)[r]) for r, k in kept2.items()} == {
        r: True for r in kept2}


def test_global_scope_keeps_a_channel_in_every_group():
    model = _build(MODELS["timm resnet18"])
    example = torch.zeros(2, *IMAGE)
    groups = channel_groups(model, example, 10)
    weights = _params(model)
    with torch.no_grad():  # one group far below the rest: only the normalised scores save it
        for n in groups[0].parameters:
            weights[n] *= 1e-3
    total = sum(g.channels for g in groups)
    masks, kept = channel_masks(weights, groups, 0.99, scope="global")
    assert all(int(k.sum()) >= 1 for k in kept.values())
    pruned = sum(int((~k).sum()) for k in kept.values())
    assert pruned == min(round(0.99 * total), total - len(groups))
    _apply(model, masks)
    small, _ = shrink(model, masks, example)
    x = torch.randn(4, *IMAGE)
    with torch.no_grad():
        _assert_same_logits(small(x), model(x))


def test_include_and_exclude_globs_select_layers():
    model = _build(MODELS["torchvision resnet18"])
    example = torch.zeros(2, *IMAGE)
    everything = channel_groups(model, example, 10)
    only = channel_groups(model, example, 10, include=["layer3.*"])
    assert only and len(only) < len(everything)
    assert all(p.startswith("layer3.") for g in only for p in g.producers)
    # layer3's residual stream is written by layer3 alone: its group is selected
    assert any("layer3.0.downsample.0" in g.producers for g in only)
    masks, _ = channel_masks(_params(model), only, 0.5)
    untouched = [n for n, m in masks.items() if m.all()]
    assert "conv1.weight" in untouched and "layer2.0.conv1.weight" in untouched
    assert not masks["layer3.0.conv1.weight"].all()
    assert not masks["layer4.0.conv1.weight"].all()  # it reads layer3's pruned stream

    fewer = channel_groups(model, example, 10, include=["layer3.*"], exclude=["layer3.?.conv1"])
    assert {g.root for g in fewer} == {g.root for g in only} - {"layer3.0.conv1", "layer3.1.conv1"}
    # the stream's group is dropped when one of its writers is excluded
    assert not any("layer2.0.conv2" in g.producers
                   for g in channel_groups(model, example, 10, exclude=["layer2.1.conv2"]))
    with pytest.raises(ValueError, match=r"include pattern 'layer9\.\*' matches no"):
        channel_groups(model, example, 10, include=["layer3.*", "layer9.*"])
    with pytest.raises(ValueError, match=r"exclude pattern 'bn1' matches no"):  # not a Conv/Linear
        channel_groups(model, example, 10, exclude=["bn1"])
    with pytest.raises(ValueError, match="no channel group can be pruned"):
        channel_groups(model, example, 10, include=["fc"])
    with pytest.raises(ValueError, match=r"not \(batch, \.\.\., 12\) logits"):
        channel_groups(model, example, 12)


def test_groups_are_plain_data_recomputed_equal_in_every_process():
    """The driver and every worker trace their own copy: the groups depend on the architecture
    and the example's shape only, not on weights, and are names and integers (JSON)."""
    a = channel_groups(_build(MODELS["torchvision mobilenet_v3_small"], seed=0),
                       torch.zeros(2, *IMAGE), 10)
    b = channel_groups(_build(MODELS["torchvision mobilenet_v3_small"], seed=7),
                       torch.zeros(2, *IMAGE), 10)
    assert a == b
    text = json.dumps([dataclasses.asdict(g) for g in a])
    assert json.loads(text)[0]["root"] == a[0].root
    # the depthwise conv and the squeeze-excitation gate that scales its output share a group
    (dw,) = [g for g in a if "features.4.block.1.0" in g.producers]
    assert {"features.4.block.0.0", "features.4.block.2.fc2"} <= set(dw.producers)
    assert "features.4.block.2.fc1.weight" in dw.parameters


def test_mlp_shrinks_and_training_mode_survives_tracing():
    torch.manual_seed(0)
    model = MLP(64, [300, 100], 10).train()
    example = torch.zeros(2, 1, 8, 8)
    groups = channel_groups(model, example, 10)
    assert model.training and all(m.training for m in model.modules())
    assert [g.root for g in groups] == ["net.0", "net.2"]
    assert pruned_parameters(groups) == [
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias", "net.4.weight"]
    masks, kept = channel_masks(_params(model), groups, 0.75, scope="layer")
    assert [int(k.sum()) for k in kept.values()] == [75, 25]
    _apply(model, masks)
    small, shapes = shrink(model.eval(), masks, example)
    assert shapes == {"net.0": {"in_features": 64, "out_features": 75},
                      "net.2": {"in_features": 75, "out_features": 25},
                      "net.4": {"in_features": 25, "out_features": 10}}
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        _assert_same_logits(small(x), model(x))


def test_shrink_refuses_masks_that_are_not_whole_channels():
    torch.manual_seed(0)
    model = MLP(64, [32], 10).eval()
    example = torch.zeros(2, 1, 8, 8)
    groups = channel_groups(model, example, 10)
    masks, _ = channel_masks(_params(model), groups, 0.5)
    masks["net.2.weight"] = torch.ones_like(masks["net.2.weight"])  # a reader keeps the channel
    with pytest.raises(ValueError, match="keep part of them in net.2.weight"):
        shrink(model, masks, example)
    with pytest.raises(ValueError, match="does not have"):
        reshape_modules(MLP(64, [32], 10), {"net.9": {"in_features": 3}})
    with pytest.raises(ValueError, match=r"attributes \['num_features'\]"):
        reshape_modules(MLP(64, [32], 10), {"net.0": {"num_features": 3}})
