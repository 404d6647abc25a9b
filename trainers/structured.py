"""Structured (channel) pruning: whole output channels go, and then they are cut out of the model.

A channel is a conv filter or a hidden unit. Pruning one means zeroing its weights and bias (so
its output is exactly zero after ReLU / max-pool) and the next layer's weights that read it. While
the student trains these are ordinary masks, kept in force by the same machinery as magnitude
pruning; at export `shrink` removes the dead channels, so the model really has fewer parameters
and does less arithmetic.

Channels are scored by the norm of their weights over their fan-in (`l1`: mean |w|, `l2`: root
mean square), so that layers with different fan-in compare on one scale when a single threshold
is used across layers (`scope: global`). The classifier's outputs are never pruned, and every
layer keeps at least one channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ChannelGroup:
    """The output channels of one layer and where the next layer reads them."""

    layer: str  # module name, e.g. "features.0"
    channels: int
    next_layer: str
    next_kind: str  # "conv": next layer's input channels; "linear": blocks of its input columns
    block: int  # input columns per channel in the next layer (spatial size after a conv)


def channel_groups(model: nn.Module, layers: list[str] | None = None) -> list[ChannelGroup]:
    """Every prunable channel group of a sequential Conv/Linear model, in forward order."""
    from trainers.features import is_projection

    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and not is_projection(n)]
    groups = []
    for (name, layer), (next_name, nxt) in zip(convs, convs[1:]):
        if layers is not None and name not in layers:
            continue
        out = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
        if isinstance(nxt, nn.Conv2d):
            groups.append(ChannelGroup(name, out, next_name, "conv", 1))
        else:
            if nxt.in_features % out:
                raise ValueError(f"{next_name} reads {nxt.in_features} inputs, not a multiple of "
                                 f"{name}'s {out} channels")
            groups.append(ChannelGroup(name, out, next_name, "linear", nxt.in_features // out))
    return groups


def channel_scores(weight: torch.Tensor, norm: str) -> torch.Tensor:
    """One score per output channel: the mean |w| (l1) or root mean square (l2) of its weights."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    if norm == "l1":
        return flat.abs().mean(1)
    return flat.pow(2).mean(1).sqrt()


def channel_masks(
    weights: dict[str, torch.Tensor],  # parameter name -> full fp32 tensor (weights and biases)
    groups: list[ChannelGroup],
    sparsity: float,
    *,
    norm: str = "l1",
    scope: str = "global",
    previous: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(parameter masks, kept-channel masks per layer) pruning `round(sparsity * channels)`.

    Channels pruned in an earlier round stay pruned (they rank first). Masks cover every tensor
    in `weights`; tensors no pruned channel touches get all-True masks.
    """
    previous_kept = kept_channels(previous, groups) if previous else {}
    scores = {}
    for g in groups:
        s = channel_scores(weights[f"{g.layer}.weight"], norm)
        if g.layer in previous_kept:
            s = torch.where(previous_kept[g.layer], s, torch.full_like(s, -1.0))
        scores[g.layer] = s
    kept = {g.layer: torch.ones(g.channels, dtype=torch.bool) for g in groups}
    if scope == "layer":
        for g in groups:
            k = min(g.channels - 1, int(round(sparsity * g.channels)))
            kept[g.layer][torch.argsort(scores[g.layer], stable=True)[:k]] = False
    else:
        flat = torch.cat([scores[g.layer] for g in groups])
        owner = torch.cat([torch.full((g.channels,), i) for i, g in enumerate(groups)])
        index = torch.cat([torch.arange(g.channels) for g in groups])
        k = int(round(sparsity * flat.numel()))
        left = {g.layer: g.channels for g in groups}
        for j in torch.argsort(flat, stable=True).tolist():
            if k == 0:
                break
            g = groups[int(owner[j])]
            if left[g.layer] == 1:  # a layer with no channel left would cut the network
                continue
            kept[g.layer][int(index[j])] = False
            left[g.layer] -= 1
            k -= 1
    masks = {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    for g in groups:
        dead = ~kept[g.layer]
        masks[f"{g.layer}.weight"][dead] = False
        if f"{g.layer}.bias" in masks:
            masks[f"{g.layer}.bias"][dead] = False
        nxt = masks[f"{g.next_layer}.weight"]
        if g.next_kind == "conv":
            nxt[:, dead] = False
        else:
            nxt[:, dead.repeat_interleave(g.block)] = False
    return masks, kept


def kept_channels(masks: dict[str, torch.Tensor], groups: list[ChannelGroup]) -> dict[str, torch.Tensor]:
    """Which output channels of each group survive, read back from parameter masks."""
    out = {}
    for g in groups:
        m = masks.get(f"{g.layer}.weight")
        if m is not None:
            out[g.layer] = m.reshape(m.shape[0], -1).any(1)
    return out


def shrink(
    arch: dict, state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], model: nn.Module
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Cut pruned channels out: the smaller architecture and its state dict.

    `model` is the full-size model (for the layer order); `arch` is its architecture dict from
    `trainers.models.architecture`.
    """
    groups = channel_groups(model)
    kept = kept_channels(masks, groups)
    state = {k: v.clone() for k, v in state.items()}
    for g in groups:
        keep = kept.get(g.layer)
        if keep is None or bool(keep.all()):
            continue
        idx = keep.nonzero().flatten()
        state[f"{g.layer}.weight"] = state[f"{g.layer}.weight"][idx]
        if f"{g.layer}.bias" in state:
            state[f"{g.layer}.bias"] = state[f"{g.layer}.bias"][idx]
        nxt = state[f"{g.next_layer}.weight"]
        if g.next_kind == "conv":
            state[f"{g.next_layer}.weight"] = nxt[:, idx]
        else:
            cols = (idx[:, None] * g.block + torch.arange(g.block)[None, :]).flatten()
            state[f"{g.next_layer}.weight"] = nxt[:, cols]
    widths = [int(kept[g.layer].sum()) if g.layer in kept else g.channels for g in groups]
    arch = dict(arch)
    if arch["kind"] == "mlp":
        arch["hidden"] = widths
    elif arch["kind"] == "lenet5":
        arch["widths"] = widths
    else:
        raise ValueError(f"cannot shrink architecture kind {arch['kind']!r}")
    return arch, state
