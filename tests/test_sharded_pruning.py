"""Global magnitude pruning from shards (ZeRO-3): the masks equal the unsharded computation's.

`sharded_magnitude_masks` sees only each rank's pieces of the weights; these tests cut the same
weights into pieces in many ways and compare every mask bit with `GlobalMagnitudePruner.
compute_masks` on the whole weights. Masks are compared for equality, bit for bit: both sides
pick exactly round(sparsity * N) weights, so any difference is a wrong pick, not rounding.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.pruning import GlobalMagnitudePruner, magnitude_keys, sharded_magnitude_masks

SHAPES = [(24, 16), (16,), (10, 3, 3, 3), (7, 24), (1,)]


def make_case(seed: int, with_previous: bool):
    """Weights drawn from 9 levels (hundreds of exact ties at any threshold), with -0.0, and
    previous masks pruning about 30% whose pruned weights are not zero (as after bf16
    rounding); returns (weights, previous or None)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, shape in enumerate(SHAPES):
        w = (torch.randint(-4, 5, shape, generator=g).float() * 0.125)
        w[w == 0] = torch.where(torch.rand(int((w == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
        weights[f"layer{i}.weight"] = w
    if not with_previous:
        return weights, None
    previous = {n: torch.rand(w.shape, generator=g) > 0.3 for n, w in weights.items()}
    return weights, previous


def flat_pieces(weights: dict, world: int, seed: int, layout: str):
    """Cut the concatenation of the flattened weights into pieces for `world` ranks:
    `zero3` as DeepSpeed partitions each parameter (rank r holds elements [r*p, (r+1)*p) of
    every parameter, p = ceil(numel / world), padding dropped), `random` in random contiguous
    pieces dealt to random ranks. Returns per rank a list of (global offset, length)."""
    per_rank = [[] for _ in range(world)]
    if layout == "zero3":
        start = 0
        for w in weights.values():
            n = w.numel()
            p = -(-n // world)
            for r in range(world):
                lo, hi = min(n, r * p), min(n, (r + 1) * p)
                per_rank[r].append((start + lo, hi - lo))  # empty past the end: padding only
            start += n
        return per_rank
    total = sum(w.numel() for w in weights.values())
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set(torch.randint(1, total, (12,), generator=g).tolist()))
    bounds = [0, *cuts, total]
    for lo, hi in zip(bounds, bounds[1:]):
        per_rank[int(torch.randint(0, world, (1,), generator=g))].append((lo, hi - lo))
    return per_rank


def run_case(weights, previous, sparsity, pieces, group=None):
    """This rank's masks from its pieces, checked against the unsharded masks; returns the
    number of weights that share the threshold's key (the ties the selection had to split)."""
    names = list(weights)
    flat = torch.cat([weights[n].flatten() for n in names])
    prev = None if previous is None else torch.cat([previous[n].flatten() for n in names])
    shards = [flat[o : o + n].clone() for o, n in pieces]
    prev_shards = None if prev is None else [prev[o : o + n] for o, n in pieces]
    masks, threshold = sharded_magnitude_masks(
        shards, [o for o, _ in pieces], sparsity, prev_shards, group=group)
    ref_masks, ref_threshold = GlobalMagnitudePruner.compute_masks(weights, sparsity, previous)
    ref = torch.cat([ref_masks[n].flatten() for n in names])
    for (o, n), mask in zip(pieces, masks):
        assert torch.equal(mask, ref[o : o + n]), f"piece at {o} (+{n}) differs, sparsity {sparsity}"
    # the same float32 value (both NaN when the threshold falls among NaN weights)
    assert threshold == ref_threshold or (math.isnan(threshold) and math.isnan(ref_threshold))
    keys = magnitude_keys(flat, prev)
    return int((keys == keys[~ref].max()).sum()) if (~ref).any() else 0


CASES = [  # (seed, previous masks, sparsity)
    (0, False, 0.5), (1, False, 0.9), (2, True, 0.36), (3, True, 0.55), (4, True, 0.97),
    (5, False, 0.0003), (6, False, 0.0),
]


@pytest.mark.parametrize("layout", ["zero3", "random"])
@pytest.mark.parametrize("seed,with_previous,sparsity", CASES)
def test_one_rank_with_pieces_matches_unsharded(seed, with_previous, sparsity, layout):
    """No process group: every piece on this rank, in any order."""
    weights, previous = make_case(seed, with_previous)
    pieces = [p for rank in flat_pieces(weights, 3, seed, layout) for p in rank]
    pieces = pieces[::-1]  # the pieces' order on a rank does not matter, their offsets do
    ties = run_case(weights, previous, sparsity, pieces)
    if sparsity >= 0.3:
        assert ties > 10  # the threshold falls among many equal magnitudes


def test_exact_sparsity_in_previous_masks_keeps_them_and_revival_is_refused():
    weights, previous = make_case(7, True)
    already = sum(int((~m).sum()) for m in previous.values())
    total = sum(m.numel() for m in previous.values())
    pieces = [p for rank in flat_pieces(weights, 2, 7, "random") for p in rank]
    run_case(weights, previous, already / total, pieces)  # k == already: the same masks
    with pytest.raises(ValueError, match="revive"):
        run_case(weights, previous, (already - 5) / total, pieces)


def test_special_values_order_as_torch_sorts_them():
    weights = {"w": torch.tensor([float("nan"), float("inf"), -0.0, 0.0, -1.0, 1.0, 3e-45,
                                  float("-inf"), 1e38, float("nan")])}
    for sparsity in [0.1, 0.3, 0.5, 0.7, 0.8, 0.9]:
        run_case(weights, None, sparsity, [(0, 4), (4, 6)])


def _rank_main(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = []
        for seed, with_previous, sparsity in CASES:
            weights, previous = make_case(seed, with_previous)
            for layout in ("zero3", "random"):
                pieces = flat_pieces(weights, world, seed, layout)[rank]
                ties = run_case(weights, previous, sparsity, pieces)
                results.append({"seed": seed, "layout": layout, "pieces": len(pieces),
                                "ties": ties})
        # a sparsity that would revive pruned weights fails on every rank, none left waiting
        weights, previous = make_case(2, True)
        try:
            run_case(weights, previous, 0.1, flat_pieces(weights, world, 2, "zero3")[rank])
            refused = False
        except ValueError:
            refused = True
        dist.barrier()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
            {"results": results, "refused": refused}))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_compute_the_unsharded_masks(tmp_path):
    """2 processes, each with only its pieces (ZeRO-3 partitions, then random cuts), over gloo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    out = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(o["refused"] for o in out)
    for r0, r1 in zip(out[0]["results"], out[1]["results"]):
        assert r0["pieces"] + r1["pieces"] > 0 and r0["ties"] == r1["ties"]
    assert len(out[0]["results"]) == 2 * len(CASES)
    assert max(r["ties"] for r in out[0]["results"]) > 50  # thresholds inside long runs of ties
