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
import torch.distributed as dist
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
        h.update(masks[name].to(torch.uint8).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------- the global threshold from shards

# Keys that order weights exactly as `GlobalMagnitudePruner.compute_masks` orders its scores. For
# non-negative float32 values the IEEE-754 bit pattern, read as an int32, increases with the
# value, so |w| maps to its bits; every NaN (sorted last by torch, equal among themselves) maps to
# one key above +inf's; previously pruned weights map to -1, below every magnitude.
PRUNED_KEY = -1
NAN_KEY = 0x7F800001  # +inf is 0x7F800000


def magnitude_keys(weights: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) int32 keys of a flattened weight tensor; `previous` is its bool mask (True = kept)."""
    magnitude = weights.detach().float().abs().flatten().contiguous()  # (n,) fp32
    keys = magnitude.view(torch.int32)
    keys = torch.where(torch.isnan(magnitude), torch.full_like(keys, NAN_KEY), keys)
    if previous is not None:
        keys = torch.where(previous.flatten().to(keys.device), keys,
                           torch.full_like(keys, PRUNED_KEY))
    return keys


def key_value(key: int) -> float:
    """The score `compute_masks` reports as the threshold for a key."""
    if key == PRUNED_KEY:
        return -1.0
    return float(torch.tensor([key], dtype=torch.int32).view(torch.float32))


def sharded_magnitude_masks(
    shards: list[torch.Tensor],  # this rank's pieces of the flattened prunable weights, any shape
    offsets: list[int],  # each piece's start in the concatenation of all flattened weights
    sparsity: float,
    previous: list[torch.Tensor] | None = None,  # bool masks (True = kept) shaped like `shards`
    group=None,  # torch.distributed process group over the ranks that hold the pieces
    device: torch.device | None = None,  # where counts are all-reduced (the backend's device)
) -> tuple[list[torch.Tensor], float]:
    """Global magnitude pruning masks for sharded weights, identical to what
    `GlobalMagnitudePruner.compute_masks` gives on the whole weights, and the threshold.

    The pieces of all ranks together must cover the concatenation of the flattened weights (in
    parameter order) exactly once, as ZeRO-3's partitions do. No rank sees another rank's
    weights: the k-th smallest key (k = round(sparsity * N)) is found by a radix selection over
    all-reduced 256-bin histograms (four passes of 8 bits over the 31-bit key + 1), and of the
    weights whose key equals it, those first in global order are pruned, as a stable sort of the
    whole would prune them; each rank learns from an all-gather of (offset, length, ties) per
    piece how many of its own ties that makes. Communication: 6 collectives of at most
    256 int64 or 3 int64 per piece, whatever the model's size. Hand-written because
    `torch.kthvalue` and `torch.topk` need the whole tensor on one rank.
    """
    device = device or (shards[0].device if shards else torch.device("cpu"))
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            dist.all_reduce(t, group=group)
        return t

    keys = [magnitude_keys(s, None if previous is None else previous[i]).to(device)
            for i, s in enumerate(shards)]  # (n_i,) int32 each
    totals = all_reduce(torch.tensor(
        [sum(k.numel() for k in keys), sum(int((k == PRUNED_KEY).sum()) for k in keys)],
        dtype=torch.int64, device=device))
    total, already = int(totals[0]), int(totals[1])
    k = int(round(sparsity * total))
    if previous is not None and k < already:
        raise ValueError(f"sparsity {sparsity} would revive {already - k} pruned weights")
    if k == 0:
        return [torch.ones_like(key, dtype=torch.bool).view(s.shape)
                for key, s in zip(keys, shards)], 0.0

    # radix selection of the k-th smallest u = key + 1 (in [0, 2^31)), 8 bits at a time
    shifted = [key + 1 for key in keys]
    prefix, rank_left, below = 0, k, 0  # the digits found, the rank sought among candidates
    for shift in (24, 16, 8, 0):
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        for u in shifted:
            candidates = u if shift == 24 else u[(u >> (shift + 8)) == (prefix >> (shift + 8))]
            hist += torch.bincount(((candidates >> shift) & 0xFF).long(), minlength=256)
        cumulative = all_reduce(hist).cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor([rank_left], device=device)))
        before = int(cumulative[digit - 1]) if digit > 0 else 0  # candidates below this digit
        rank_left -= before
        below += before
        prefix |= digit << shift
    threshold_key = prefix - 1
    ties_to_prune = k - below  # >= 1 weights with the threshold key, first in global order

    # how many of the ties precede each of this rank's pieces in global order
    local = torch.tensor(
        [[offset, key.numel(), int((key == threshold_key).sum())]
         for offset, key in zip(offsets, keys) if key.numel()], dtype=torch.int64, device=device,
    ).reshape(-1, 3)  # empty pieces (ZeRO-3 padding) hold no weights and may share an offset
    pieces = _all_gather_rows(local, world, group, device)  # (pieces of all ranks, 3)
    order = torch.argsort(pieces[:, 0], stable=True)
    pieces = pieces[order]
    ends = pieces[:, 0] + pieces[:, 1]
    if bool((ends[:-1] > pieces[1:, 0]).any()) or int(pieces[:, 1].sum()) != total:
        raise ValueError("the shards' offsets overlap: each weight must be on exactly one rank")
    ties_before = dict(zip(pieces[:, 0].tolist(), (pieces[:, 2].cumsum(0) - pieces[:, 2]).tolist()))

    masks = []
    for offset, key, shard in zip(offsets, keys, shards):
        if not key.numel():
            masks.append(torch.ones_like(key, dtype=torch.bool).view(shard.shape))
            continue
        tie = key == threshold_key
        quota = ties_to_prune - ties_before[offset]  # ties this piece prunes, from its start
        pruned = (key < threshold_key) | (tie & (torch.cumsum(tie, 0) <= quota))
        masks.append((~pruned).view(shard.shape))
    return masks, key_value(threshold_key)


def _all_gather_rows(rows: torch.Tensor, world: int, group, device) -> torch.Tensor:
    """Concatenate every rank's (n_r, c) int64 rows; ranks may hold different counts."""
    if world == 1:
        return rows
    count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    width = max(int(c) for c in counts)
    padded = torch.zeros(width, rows.shape[1], dtype=torch.int64, device=device)
    padded[: rows.shape[0]] = rows
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: int(c)] for g, c in zip(gathered, counts)])
