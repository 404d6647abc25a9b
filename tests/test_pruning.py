"""Global magnitude pruning and its schedules, on plain torch modules (no Ray)."""

import numpy as np
import pytest
import torch

from specs import parse_spec
from trainers.models import LeNet5, MLP
from trainers.plan import student_phases
from trainers.pruning import (
    GlobalMagnitudePruner,
    apply_masks_,
    mask_digest,
    prunable_parameters,
    round_sparsity,
    sparsity_schedule,
    sparsity_stats,
)

BASE = {
    "name": "t",
    "data": {"kind": "digits"},
    "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
    "student": {"model": {"kind": "mlp", "hidden": [8]}},
}


def pruning(**kw):
    return parse_spec({**BASE, "pruning": kw}).pruning


def test_threshold_is_kth_smallest_magnitude_over_all_layers():
    torch.manual_seed(0)
    weights = {"a": torch.randn(30, 20), "b": torch.randn(50), "c": torch.randn(7, 3, 3)}
    all_mags = np.sort(np.concatenate([w.abs().flatten().numpy() for w in weights.values()]))
    for sparsity in (0.1, 0.5, 0.9, 0.97):
        masks, threshold = GlobalMagnitudePruner.compute_masks(weights, sparsity)
        k = round(sparsity * all_mags.size)
        assert threshold == pytest.approx(float(all_mags[k - 1]))
        pruned = sum(int((~m).sum()) for m in masks.values())
        assert pruned == k
        for name, w in weights.items():  # one global threshold, not one per layer
            assert (w.abs()[~masks[name]] <= threshold).all()
            assert (w.abs()[masks[name]] >= threshold).all()


def test_layers_end_up_with_different_sparsities():
    weights = {"small": torch.randn(1000) * 0.01, "large": torch.randn(1000)}
    masks, _ = GlobalMagnitudePruner.compute_masks(weights, 0.5)
    assert (~masks["small"]).float().mean() > 0.95
    assert (~masks["large"]).float().mean() < 0.05


def test_ties_still_prune_exactly_k():
    weights = {"a": torch.zeros(10), "b": torch.ones(10)}
    masks, threshold = GlobalMagnitudePruner.compute_masks(weights, 0.25)
    assert sum(int((~m).sum()) for m in masks.values()) == 5 and threshold == 0.0


def test_pruned_weights_stay_pruned_in_later_rounds():
    torch.manual_seed(1)
    w = {"a": torch.randn(100), "b": torch.randn(100)}
    first, _ = GlobalMagnitudePruner.compute_masks(w, 0.3)
    # a pruned weight that (say, through bf16 rounding) is not exactly zero any more
    revived = {k: torch.where(first[k], v, torch.full_like(v, 5.0)) for k, v in w.items()}
    second, _ = GlobalMagnitudePruner.compute_masks(revived, 0.6, previous=first)
    for k in w:
        assert not (second[k] & ~first[k]).any()
    assert sum(int((~m).sum()) for m in second.values()) == 120
    with pytest.raises(ValueError, match="revive"):
        GlobalMagnitudePruner.compute_masks(w, 0.1, previous=first)


def test_prunable_parameters_are_linear_and_conv_weights():
    model = LeNet5((1, 28, 28), 10)
    spec = pruning()
    names = set(prunable_parameters(model, spec))
    assert names == {"features.0.weight", "features.2.weight", "classifier.0.weight",
                     "classifier.2.weight"}
    with_bias = prunable_parameters(model, pruning(include_bias=True))
    assert "features.0.bias" in with_bias
    chosen = prunable_parameters(model, pruning(layers=["classifier.0"]))
    assert set(chosen) == {"classifier.0.weight"}
    with pytest.raises(ValueError, match="no Linear/Conv"):
        prunable_parameters(model, pruning(layers=["classifier.9"]))


def test_apply_masks_and_stats():
    model = MLP(64, [32], 10)
    params = prunable_parameters(model, pruning())
    masks, _ = GlobalMagnitudePruner.compute_masks({k: v.detach() for k, v in params.items()}, 0.75)
    apply_masks_(params, masks)
    per_layer, nonzero, total = sparsity_stats({k: v.detach() for k, v in params.items()})
    assert total == 64 * 32 + 32 * 10 and nonzero == total - round(0.75 * total)
    assert set(per_layer) == set(params)
    assert mask_digest(masks) == mask_digest({k: v.clone() for k, v in masks.items()})


def test_schedules():
    geo = pruning(target_sparsity=0.875, rounds=3, schedule={"kind": "geometric"})
    assert sparsity_schedule(geo) == pytest.approx([0.5, 0.75, 0.875])
    geo_k = pruning(target_sparsity=0.8, rounds=3, schedule={"kind": "geometric", "keep_fraction": 0.5})
    assert sparsity_schedule(geo_k) == pytest.approx([0.5, 0.75, 0.8])
    agp = pruning(target_sparsity=0.9, rounds=4, schedule={"kind": "agp", "initial_sparsity": 0.1})
    expected = [0.9 + (0.1 - 0.9) * (1 - r / 4) ** 3 for r in range(1, 5)]
    assert sparsity_schedule(agp) == pytest.approx(expected)
    assert sparsity_schedule(pruning(target_sparsity=0.7, rounds=1, schedule={"kind": "oneshot"})) == [0.7]
    explicit = pruning(target_sparsity=0.95, rounds=3, schedule={"kind": "explicit", "sparsities": [0.5, 0.9, 0.95]})
    assert sparsity_schedule(explicit) == [0.5, 0.9, 0.95]
    for spec in (geo, geo_k, agp, explicit):  # monotone, ends on target
        s = sparsity_schedule(spec)
        assert all(b > a for a, b in zip(s, s[1:])) and s[-1] == spec.target_sparsity
    with pytest.raises(ValueError):
        round_sparsity(geo, 4)


def test_fine_tuning_epochs_per_round_become_the_phases():
    spec = parse_spec({**BASE, "pruning": {
        "target_sparsity": 0.9, "rounds": 3, "finetune_epochs": [1, 0, 4],
        "schedule": {"kind": "explicit", "sparsities": [0.5, 0.8, 0.9]}}})
    prune = [p for p in student_phases(spec) if p.kind == "prune"]
    assert [(p.round, p.target_sparsity, p.epochs) for p in prune] == [
        (1, 0.5, 1), (2, 0.8, 0), (3, 0.9, 4)]
    one = parse_spec({**BASE, "pruning": {"rounds": 2, "finetune_epochs": 3}})
    assert [p.epochs for p in student_phases(one) if p.kind == "prune"] == [3, 3]
