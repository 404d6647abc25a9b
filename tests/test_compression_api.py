"""Compression as plain functions on a model (no Ray, no DeepSpeed), configured by the spec's
own sections: what the README's example does."""

import pytest
import torch
import timm

from specs.job import PruningSpec, QuantizationSpec
from trainers.compression import prune_, quantize_
from trainers.models import MLP


def test_global_magnitude_prune_and_int8_of_an_mlp():
    torch.manual_seed(0)
    model = MLP(64, [32, 16], 10).eval()
    masks = prune_(model, PruningSpec(target_sparsity=0.9))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    total = sum(w.numel() for w in weights)
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == round(0.9 * total)  # exactly the target, one global threshold
    assert all(int((~m).sum()) > 0 for m in masks.values())
    small = quantize_(model, QuantizationSpec(method="dynamic"), masks=masks)
    x = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        agree = (small(x).argmax(-1) == model(x).argmax(-1)).float().mean()
    assert agree > 0.9  # int8 weights and activations: nearly every prediction kept


def test_channel_pruning_of_a_timm_resnet_keeps_it_running():
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=3).eval()
    x = torch.randn(2, 3, 32, 32)
    masks = prune_(model, PruningSpec(granularity="channel", target_sparsity=0.5, rounds=1,
                                      schedule={"kind": "oneshot"}), example_input=x)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
    stem = masks["conv1.0.weight"]
    assert 0 < int((~stem.flatten(1).any(1)).sum()) < stem.shape[0]  # some filters, not all
    with pytest.raises(ValueError, match="example_input"):
        prune_(model, PruningSpec(granularity="channel"))
