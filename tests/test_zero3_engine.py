"""The engine under ZeRO 3 on two gloo ranks (real DeepSpeed, two processes, no Ray): pruning
from the shards gives the unsharded pruner's masks on every rank, the masks hold on each rank's
slices of the module and of the fp32 master copy, and a DeepSpeed checkpoint resumes exactly.
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _engine(persistence: int, precision: str, gpus: int = 0):
    from specs import parse_spec
    from trainers.engine import DistillEngine
    from trainers.models import MLP

    spec = parse_spec({
        "name": "zero3", "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
        "student": {"model": {"kind": "mlp", "hidden": [33, 17]}},  # odd sizes: padded slices
        "precision": precision,
        "deepspeed": {"zero_stage": 3, "param_persistence_threshold": persistence},
        "resources": {"student_gpus": gpus},
    })
    torch.manual_seed(0)  # the same initial weights on both ranks
    return DistillEngine(MLP(64, [33, 17], 10), spec, lr=0.05, micro_batch=8,
                         weight_decay=0.01, grad_clip=1.0, world_size=2)


def _steps(engine, rank: int, n: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed * 10 + rank)  # each rank its own batches
    losses = []
    for _ in range(n):
        x = torch.randn(8, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        t = torch.randn(8, 10, generator=g)
        losses.append(engine.train_step(x, y, t, 2.0, 0.5))
    return losses


CONFIGS = [(0, "bf16"), (100_000, "fp32")]  # (param_persistence_threshold, precision)


def _rank_main(rank: int, port: int, out_dir: str, gpus: int = 0) -> None:
    """One rank: gloo on the CPU, or (gpus=1, tests/test_gpu.py) NCCL on GPU `rank`."""
    from spawned_ranks import exit_without_teardown
    from trainers.engine import set_distributed_env

    # DeepSpeed's collectives call torch's deprecated names on every step
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = None
    if gpus:
        torch.cuda.set_device(rank)  # as Ray Train does for its workers
        device = torch.device("cuda", rank)
    set_distributed_env(rank, rank, 2, 2, device)
    dist.init_process_group("nccl" if gpus else "gloo", rank=rank, world_size=2)
    try:  # both configurations in one pair of processes: most of the time is start-up
        for persistence, precision in CONFIGS:
            result = _check(rank, Path(out_dir) / f"{persistence}-{precision}", persistence,
                            precision, gpus)
            Path(out_dir, f"{persistence}-{precision}-rank{rank}.json").write_text(
                json.dumps(result))
        dist.barrier()  # no rank tears the gloo pair down while its peer still uses it
    finally:
        dist.destroy_process_group()
    exit_without_teardown()


def _check(rank: int, folder: Path, persistence: int, precision: str, gpus: int) -> dict:
    from trainers.pruning import GlobalMagnitudePruner, mask_digest

    engine = _engine(persistence, precision, gpus)
    names = list(engine.prunable)
    _steps(engine, rank, 3, seed=1)
    # between steps (DeepSpeed decides persistence on the first forward)
    partitioned = [p.data.numel() == 0 for p in engine.prunable.values()]
    result = {"partitioned": partitioned, "rounds": []}
    previous = None
    for sparsity in (0.5, 0.8):
        # the reference: the unsharded pruner on the gathered weights (the test may gather)
        weights = engine.full_fp32_weights(names)
        expected, threshold = GlobalMagnitudePruner.compute_masks(weights, sparsity, previous)

        def gathered(*args, **kwargs):
            raise AssertionError("pruning under ZeRO 3 gathered full weights")

        engine.full_fp32_weights = gathered  # prune_to may not use it
        try:
            got = engine.prune_to(sparsity)
        finally:
            del engine.full_fp32_weights
        equal = all(torch.equal(engine.masks[n].cpu(), expected[n]) for n in names)
        _steps(engine, rank, 3, seed=2)
        after = engine.full_fp32_weights(names)
        result["rounds"].append({
            # exact: the threshold is one weight's magnitude, the same float32 on both sides
            "threshold_equal": got == threshold, "masks_equal": equal,
            "digest": mask_digest(engine.masks), "masked_nonzero": engine.masked_nonzero(),
            "pruned_fp32_nonzero": sum(int(torch.count_nonzero(after[n][~expected[n]]))
                                       for n in names),
            "pruned": sum(int((~m).sum()) for m in expected.values()),
            "total": sum(m.numel() for m in expected.values()),
        })
        previous = expected

    # DeepSpeed's checkpoint (each rank's partitions) plus the masks: an exact resume
    engine.save_deepspeed(str(folder), tag="t")
    saved = engine.full_fp32_weights()
    fresh = _engine(persistence, precision, gpus)
    fresh.load_deepspeed(str(folder), tag="t")
    fresh.set_masks({n: m.cpu() for n, m in engine.masks.items()})
    loaded = fresh.full_fp32_weights()
    result["resume_weights_equal"] = all(torch.equal(loaded[n], saved[n]) for n in saved)
    # bitwise: the same state and batches through the same kernels
    result["resume_steps_equal"] = _steps(fresh, rank, 2, seed=3) == _steps(engine, rank, 2, seed=3)
    a, b = fresh.full_fp32_weights(), engine.full_fp32_weights()
    result["resume_after_steps_equal"] = all(torch.equal(a[n], b[n]) for n in a)
    result["resume_masked_nonzero"] = fresh.masked_nonzero()
    return result


def test_two_rank_zero3_prunes_from_shards_and_resumes_exactly(tmp_path):
    """persistence 0: every parameter partitioned (each rank holds half of each); 100000: the
    small parameters stay whole on both ranks between steps (the fp32 master copy is
    partitioned either way), and both copies are masked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(tmp_path)), nprocs=2, join=True)
    check_results(tmp_path)


def check_results(out_dir: Path) -> None:
    for persistence, precision in CONFIGS:
        ranks = [json.loads((out_dir / f"{persistence}-{precision}-rank{r}.json").read_text())
                 for r in range(2)]
        _check_ranks(ranks, persistence)


def _check_ranks(ranks: list[dict], persistence: int) -> None:
    for r in ranks:
        assert all(r["partitioned"]) == (persistence == 0) and any(r["partitioned"]) == (persistence == 0)
        for round_ in r["rounds"]:
            assert round_["threshold_equal"] and round_["masks_equal"], round_
            assert round_["masked_nonzero"] == [0, 0], round_  # after 3 more steps
            assert round_["pruned_fp32_nonzero"] == 0
        assert [x["pruned"] for x in r["rounds"]] == [round(s * r["rounds"][0]["total"])
                                                     for s in (0.5, 0.8)]
        assert r["resume_weights_equal"] and r["resume_steps_equal"]
        assert r["resume_after_steps_equal"] and r["resume_masked_nonzero"] == [0, 0]
    assert [x["digest"] for x in ranks[0]["rounds"]] == [x["digest"] for x in ranks[1]["rounds"]]
