"""Compression as plain functions on a model, configured by the spec's own sections.

    from specs.job import PruningSpec, QuantizationSpec
    from trainers.compression import prune_, quantize_

    masks = prune_(model, PruningSpec(target_sparsity=0.9), example_input=x[:2])
    small = quantize_(model, QuantizationSpec(method="dynamic"), masks=masks)

No Ray and no DeepSpeed here: a job's workers call `prune_masks` on DeepSpeed's fp32 master
weights (trainers/engine.py) and the driver's export calls the quantizers the same way
(orchestrator/compress.py); these functions do the same on any `nn.Module`, in the spirit of
torchao's `quantize_(model, config)`.
"""

from __future__ import annotations

import torch
from torch import nn

from specs.job import PruningSpec, QuantizationSpec
from trainers.pruning import GlobalMagnitudePruner, apply_masks_, prunable_parameters


def prune_masks(
    weights: dict[str, torch.Tensor], config: PruningSpec, sparsity: float,
    previous: dict[str, torch.Tensor] | None = None, groups=None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """(masks, threshold) pruning `weights` (name -> fp32 tensor) to `sparsity` the way `config`
    says: one global magnitude threshold over single weights, or whole channel `groups`
    (trainers/structured.py) by their norm. Pruned stays pruned (`previous`)."""
    if config.granularity == "channel":
        from trainers.structured import channel_masks

        if groups is None:
            raise ValueError("channel pruning needs the model's channel groups")
        masks, _ = channel_masks(weights, groups, sparsity, norm=config.norm, scope=config.scope,
                                 previous=previous)
        return masks, None  # channels, not weights: no single magnitude
    return GlobalMagnitudePruner.compute_masks(weights, sparsity, previous)


def prune_(
    model: nn.Module, config: PruningSpec, sparsity: float | None = None, *,
    example_input: torch.Tensor | None = None, num_classes: int | None = None,
    previous: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Zero the weights `config` prunes at `sparsity` (default its `target_sparsity`), in
    place; returns the masks (True = kept). Channel pruning traces the model on
    `example_input` (a batch of two or more inputs) to find its coupled channels."""
    sparsity = config.target_sparsity if sparsity is None else sparsity
    groups = None
    if config.granularity == "channel":
        from trainers.structured import channel_groups, pruned_parameters

        if example_input is None:
            raise ValueError("channel pruning needs `example_input` to trace the model")
        if num_classes is None:
            with torch.no_grad():
                num_classes = int(model.eval()(example_input).shape[-1])
        selection = config.selection
        groups = channel_groups(model, example_input, num_classes,
                                include=list(selection.include), exclude=list(selection.exclude))
        named = dict(model.named_parameters())
        params = {n: named[n] for n in pruned_parameters(groups)}
    else:
        params = prunable_parameters(model, config)
    weights = {n: p.detach().float() for n, p in params.items()}
    masks, _ = prune_masks(weights, config, sparsity, previous, groups)
    with torch.no_grad():
        apply_masks_(params, masks)
    return masks


@torch.no_grad()
def quantize_(
    model: nn.Module, config: QuantizationSpec, *, masks: dict[str, torch.Tensor] | None = None,
    calibration: torch.Tensor | None = None,
) -> nn.Module:
    """A quantized copy of `model` as `config` says (the weights on their quantized grid, pruned
    zeros kept): `dynamic` and `qat` run torch's int8 kernels for Linear layers, `static` int8
    weights and activations (calibrated on `calibration` inputs), `binary` / `ternary` / `kmeans`
    their 1-, 2- or k-means-shared weights in fp32. `qat` here is its conversion only: the
    fine-tuning is training, which a job does."""
    import copy

    from trainers.quantize import (
        calibrate_static, dynamic_int8, layer_kinds, quantize_state, static_int8,
    )

    method = config.method
    model = copy.deepcopy(model).eval()
    if method == "none":
        return model
    kinds = layer_kinds(model, method, config.bits)
    state = {k: v.detach().float() for k, v in model.state_dict().items()}
    model.load_state_dict(quantize_state(state, kinds, masks or {}))
    if method == "static":
        if calibration is None:
            raise ValueError("static int8 needs `calibration` inputs")
        return static_int8(model, calibrate_static(model, calibration),
                           tuple(calibration.shape[1:]))
    if method in ("dynamic", "qat"):
        return dynamic_int8(model)
    return model  # binary, ternary, kmeans: their values, in fp32
