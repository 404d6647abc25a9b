"""Iterative global magnitude pruning: the schedule ("when") and the pruner ("what").

The schedule is pure Python. The pruner works on a plain `nn.Module` and knows nothing of Ray or
DeepSpeed; the DeepSpeed engine wrapper calls it and keeps the masks in force on its own copies of
the weights.
"""

from __future__ import annotations

import fnmatch
import hashlib
import math

import torch
from torch import nn

from specs.job import (
    AGPSchedule,
    ExplicitSchedule,
    GeometricSchedule,
    OneShotSchedule,
    PruningSpec,
)


# ----------------------------------------------------------------------------------- schedule


def round_sparsity(spec: PruningSpec, round_index: int) -> float:
    """Target global sparsity after round `round_index` (1-based); the last round hits the target."""
    n, final = spec.rounds, spec.target_sparsity
    if not 1 <= round_index <= n:
        raise ValueError(f"round {round_index} is outside 1..{n}")
    if round_index == n:
        return final
    schedule = spec.schedule
    if isinstance(schedule, OneShotSchedule):
        return final
    if isinstance(schedule, GeometricSchedule):
        keep = schedule.keep_fraction or math.pow(1.0 - final, 1.0 / n)
        return min(final, 1.0 - keep**round_index)
    if isinstance(schedule, ExplicitSchedule):
        return schedule.sparsities[round_index - 1]
    if isinstance(schedule, AGPSchedule):
        s_i = schedule.initial_sparsity
        return final + (s_i - final) * (1.0 - round_index / n) ** 3
    raise TypeError(f"unknown schedule {type(schedule).__name__}")


def sparsity_schedule(spec: PruningSpec) -> list[float]:
    return [round_sparsity(spec, r) for r in range(1, spec.rounds + 1)]


# ------------------------------------------------------------------------------------- pruner


PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def select_layers(names: list[str], selection, what: str = "Linear/Conv") -> list[str]:
    """The names matching an include pattern and no exclude pattern, in the given order.

    A pattern (`pruning.layers`) that matches none of `names` is an error, not a silently
    unpruned layer."""
    def matching(pattern: str, side: str) -> list[str]:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(f"`pruning.layers` {side} pattern {pattern!r} matches no {what} "
                             f"module; the model has: {names[:40]}"
                             f"{' ...' if len(names) > 40 else ''}")
        return hits

    included = {n for pattern in selection.include for n in matching(pattern, "include")}
    excluded = {n for pattern in selection.exclude for n in matching(pattern, "exclude")}
    chosen = [n for n in names if n in included and n not in excluded]
    if not chosen:
        raise ValueError("`pruning.layers` selects no layer: every included layer is excluded")
    return chosen


def prunable_parameters(model: nn.Module, spec: PruningSpec) -> dict[str, nn.Parameter]:
    """Linear and Conv weights (and biases if asked) of the layers `spec.layers` selects, by
    parameter name, in module order. BatchNorm, embeddings and (unless `include_bias`) biases are
    never pruned by magnitude.

    Under `granularity: channel` every Linear/Conv weight and bias is listed: which of them a
    pruned channel touches is the channel groups' business (trainers/structured.py).
    """
    from trainers.features import is_projection  # feature-KD projections are never pruned

    modules = {
        name: m for name, m in model.named_modules()
        if isinstance(m, PRUNABLE_TYPES) and not is_projection(name)
    }
    params: dict[str, nn.Parameter] = {}
    if spec.granularity == "channel":  # a pruned channel also zeroes its bias and its readers
        for name, module in modules.items():
            params[f"{name}.weight"] = module.weight
            if module.bias is not None:
                params[f"{name}.bias"] = module.bias
        return params
    for name in select_layers(list(modules), spec.selection):
        module = modules[name]
        params[f"{name}.weight"] = module.weight
        if spec.include_bias and module.bias is not None:
            params[f"{name}.bias"] = module.bias
    return params


class GlobalMagnitudePruner:
    """One magnitude threshold across all prunable weights.

    Already-pruned weights stay pruned: they rank below every live weight, so the sparsity after a
    round is exactly `round(target * total)` weights, never fewer than before.
    """

    @staticmethod
    def compute_masks(
        weights: dict[str, torch.Tensor],  # name -> weight (any shape), fp32 master copies
        sparsity: float,
        previous: dict[str, torch.Tensor] | None = None,  # name -> bool mask, True = kept
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Masks (True = kept) pruning exactly `round(sparsity * N)` weights, and the threshold.

        The threshold is the k-th smallest magnitude over all layers together (k = pruned count);
        ties at the threshold are broken by a stable sort, so the count is exact.
        """
        names = list(weights)
        scores = []
        for name in names:
            score = weights[name].detach().float().abs().flatten()
            if previous is not None and name in previous:
                # -1 ranks pruned weights first, whatever their (possibly bf16-rounded) value
                score = torch.where(previous[name].flatten(), score, torch.full_like(score, -1.0))
            scores.append(score)
        flat = torch.cat(scores)  # (N,)
        total = flat.numel()
        k = int(round(sparsity * total))
        if previous is not None:
            already = sum(int((~m).sum()) for m in previous.values())
            if k < already:
                raise ValueError(f"sparsity {sparsity} would revive {already - k} pruned weights")
        keep = torch.ones(total, dtype=torch.bool)
        threshold = 0.0
        if k > 0:
            order = torch.argsort(flat, stable=True)
            keep[order[:k]] = False
            threshold = float(flat[order[k - 1]])
        masks, offset = {}, 0
        for name in names:
            n = weights[name].numel()
            masks[name] = keep[offset : offset + n].view_as(weights[name]).clone()
            offset += n
        return masks, threshold


@torch.no_grad()
def apply_masks_(params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries in place."""
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))


def sparsity_stats(
    params: dict[str, torch.Tensor],
) -> tuple[dict[str, float], int, int]:
    """Per-layer sparsity, total nonzeros and total count over the given tensors."""
    per_layer, nonzero, total = {}, 0, 0
    for name, p in params.items():
        nz = int(torch.count_nonzero(p))
        per_layer[name] = 1.0 - nz / p.numel()
        nonzero += nz
        total += p.numel()
    return per_layer, nonzero, total


def mask_digest(masks: dict[str, torch.Tensor]) -> str:
    """A short hash of the masks, to check that every worker holds the same ones."""
    h = hashlib.sha256()
    for name in sorted(masks):
        h.update(name.encode())
        h.update(masks[name].to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
