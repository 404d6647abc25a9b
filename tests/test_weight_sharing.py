"""Weight sharing's fine-tuning (Deep Compression's trained quantization) in plain torch, without
Ray or DeepSpeed: the fake-quantized forward on cluster means, the snap after each step, the
clusters' determinism, and the snap of master copies split across two gloo ranks."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load, save
from torch.nn import functional as F

from specs.job import KMeansBits, LeNet5Model
from trainers.models import MLP, architecture, build_from_architecture
from trainers.pruning import GlobalMagnitudePruner
from trainers.quantize import (
    enable_fake_quant, layer_kinds, quantize_state, snap_shared_weights_, weight_clusters,
)


def _pruned_mlp(sparsity: float, seed: int = 0):
    """A small MLP trained a little with Adam (so every weight has its own moments), then pruned;
    returns the model, its masks and the optimizer."""
    torch.manual_seed(seed)
    model = MLP(64, [32, 16], 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = _data(seed)
    for _ in range(10):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    weights = {n: p.detach() for n, p in model.named_parameters() if n.endswith(".weight")}
    masks, _ = GlobalMagnitudePruner.compute_masks(weights, sparsity)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return model, masks, optimizer


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(256, 1, 8, 8, generator=g), torch.randint(0, 10, (256,), generator=g)


def _step(model, masks, optimizer, x, y) -> float:
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for n, p in model.named_parameters():  # what the engine's gradient hooks do
        if n in masks:
            p.grad.mul_(masks[n])
    optimizer.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in masks:
                p.mul_(masks[n])
    return float(loss.detach())


def _shared_values(model, masks) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    return {n: torch.unique(params[n].detach()[m]) for n, m in masks.items()}


def test_kinds_give_linear_and_conv_layers_their_bits():
    model = build_from_architecture(architecture(LeNet5Model(kind="lenet5"), (1, 28, 28), 10))
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=5, conv=8))
    assert kinds == {"features.0": "kmeans8", "features.2": "kmeans8",
                     "classifier.0": "kmeans5", "classifier.2": "kmeans5"}
    with pytest.raises(ValueError, match="bits"):
        layer_kinds(model, "kmeans")


@pytest.mark.parametrize("bits", [2, 4])
def test_fine_tuning_keeps_each_layer_on_its_shared_values(bits):
    model, masks, optimizer = _pruned_mlp(0.6)
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=bits))
    clusters = weight_clusters(dict(model.named_parameters()), kinds, masks)
    enable_fake_quant(model, kinds, masks, clusters)
    snap_shared_weights_(model)
    start = _shared_values(model, masks)
    assert all(len(v) <= 2**bits for v in start.values())
    x, y = _data(1)
    params = dict(model.named_parameters())
    drifted = False
    for _ in range(8):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for name, codes in clusters.items():  # each cluster's weights get one averaged gradient
            grad = params[name].grad
            for c in range(int(codes.max()) + 1):
                assert len(torch.unique(grad[codes == c])) == 1, (name, c)
        optimizer.step()
        # Adam's per-weight moments (from the training before pruning) move a cluster's weights
        # apart, equal gradients or not: the snap is what keeps them shared
        drifted |= any(len(torch.unique(params[n].detach()[m])) > 2**bits for n, m in masks.items())
        with torch.no_grad():
            for n, p in params.items():
                if n in masks:
                    p.mul_(masks[n])
        snap_shared_weights_(model)
        for name, codes in clusters.items():
            w = params[name].detach()
            assert torch.all(w[codes < 0] == 0)  # pruned: exactly zero
            values = torch.unique(w[codes >= 0])
            assert len(values) <= 2**bits
            for c in range(int(codes.max()) + 1):  # one value per cluster
                assert len(torch.unique(w[codes == c])) == 1
    assert drifted
    end = _shared_values(model, masks)
    for name in masks:  # the centroids moved: every layer's shared values changed
        assert len(end[name]) == len(start[name]) and not torch.equal(end[name], start[name])
    # the forward is the plain model with those weights (float32 sums in another order: 1e-5)
    plain = MLP(64, [32, 16], 10)
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), rtol=1e-5, atol=1e-5)
    # and exporting them changes nothing: they are shared already
    state = {k: v.detach() for k, v in model.state_dict().items()}
    exported = quantize_state(state, kinds, masks)
    assert all(torch.equal(exported[k], state[k]) for k in state)


def test_fine_tuning_lowers_the_loss():
    model, masks, optimizer = _pruned_mlp(0.5, seed=3)
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=3))
    enable_fake_quant(model, kinds, masks, weight_clusters(dict(model.named_parameters()), kinds,
                                                           masks))
    snap_shared_weights_(model)
    x, y = _data(3)  # the data it was trained on: fine-tuning recovers what clustering cost
    losses = []
    for _ in range(30):
        losses.append(_step(model, masks, optimizer, x, y))
        snap_shared_weights_(model)
    assert losses[-1] < 0.9 * losses[0]


def test_clusters_are_recomputed_identically_from_a_checkpoint():
    """What a resumed run relies on: the phase's clusters come from the committed weights alone,
    bit for bit, whatever the thread count."""
    model, masks, _ = _pruned_mlp(0.7, seed=5)
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=5))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = weight_clusters(state, kinds, masks)
    committed = load(save(state))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = weight_clusters(committed, kinds, masks)
    finally:
        torch.set_num_threads(threads)
    assert first.keys() == again.keys() == {f"{n}.weight" for n in kinds}
    assert all(torch.equal(first[k], again[k]) for k in first)


# ------------------------------------------------------------------- partitioned master copies


def _partitioned_snap(rank: int, world: int, port: int, out: str) -> None:
    """One rank of a gloo group: the module weights are whole on every rank (as DeepSpeed keeps
    them under ZeRO 1-2), the fp32 masters are split, a layer's split in its middle."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, masks, _ = _pruned_mlp(0.5, seed=7)
        kinds = layer_kinds(model, "kmeans", KMeansBits(linear=3))
        enable_fake_quant(model, kinds, masks, weight_clusters(dict(model.named_parameters()),
                                                               kinds, masks))
        g = torch.Generator().manual_seed(11)  # the same "optimizer step" on every rank
        masters = {}
        for name, p in model.named_parameters():
            if name in masks:
                full = (p.detach() + 0.01 * torch.randn(p.shape, generator=g)) * masks[name]
                cut = p.numel() // 3
                start, stop = (0, cut) if rank == 0 else (cut, p.numel())
                masters[id(p)] = (full.reshape(-1)[start:stop].clone(), start, stop - start)
                with torch.no_grad():  # the module copy: lower precision than the master
                    p.copy_(full.to(torch.bfloat16).float())
        snap_shared_weights_(model, lambda p: masters.get(id(p)), partitioned=True)
        torch.save({"module": {n: p.detach() for n, p in model.named_parameters() if n in masks},
                    "masters": {n: masters[id(p)] for n, p in model.named_parameters()
                                if n in masks}}, out)
        # every rank done with the group before it closes: gloo aborts a process ("terminate
        # called without an active exception") whose peer tears the pair down under it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_masters_split_across_ranks_snap_to_the_same_means(tmp_path):
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_partitioned_snap, args=(r, world, port, outs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * world
    results = [torch.load(o) for o in outs]
    module = results[0]["module"]
    for name, w in module.items():
        assert torch.equal(w, results[1]["module"][name])  # every rank wrote the same means
        # the masters, put back together, hold exactly the module's values (both fp32 here)
        parts = sorted((r["masters"][name] for r in results), key=lambda t: t[1])
        assert torch.equal(torch.cat([t for t, _, _ in parts]), w.reshape(-1))
        assert len(torch.unique(w[w != 0])) <= 2**3
    # the means are those of the whole masters, not of each rank's part nor of the module copy:
    # the same snap on one process holding the whole master gives them (float64 sums added in
    # another order, cast to float32: equal within one float32 ulp)
    model, masks, _ = _pruned_mlp(0.5, seed=7)
    kinds = layer_kinds(model, "kmeans", KMeansBits(linear=3))
    enable_fake_quant(model, kinds, masks, weight_clusters(dict(model.named_parameters()), kinds,
                                                           masks))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.copy_((p + 0.01 * torch.randn(p.shape, generator=g)) * masks[name])
    snap_shared_weights_(model)
    params = dict(model.named_parameters())
    for name, w in module.items():
        assert torch.allclose(w, params[name].detach(), rtol=2e-7, atol=0)
