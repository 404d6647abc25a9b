"""Where a student step's time goes: one optimizer step of the throughput benchmark's student
(MLP 784-300-100-10, Hinton KD loss, batch 256), in one process, as a plain PyTorch loop and
through stillhouse's DeepSpeed engine, dense and with 50% of the weights pruned (masks on).

Not a test. It explains `bench/throughput.py`'s ratios: on two cores the pipeline can only beat
the hand-written loop if its steps cost no more than the loop's. They cost more: DeepSpeed's
engine wraps the same torch step (bf16_autocast is the cheapest wrapping), and this VM's timings
drift by tens of percent between runs, so compare rows of one run only.

    .venv/bin/python bench/step_profile.py                 # 2 and 1 threads
    .venv/bin/python bench/step_profile.py --json bench/results/step-profile.json

It also times one gloo all-reduce of the student's gradients between two processes, the cost a
second data-parallel worker adds to every step.

JSON: {"threads": {N: {variant: ms per step}}, "batch": B, "all_reduce_2_workers_ms": ms}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from specs import parse_spec  # noqa: E402
from trainers.engine import DistillEngine, set_distributed_env  # noqa: E402
from trainers.kd_loss import kd_loss  # noqa: E402
from trainers.models import MLP  # noqa: E402

HIDDEN = [300, 100]


def ms_per_step(step, repeats: int, rounds: int = 5) -> float:
    """The fastest of `rounds` timings of `repeats` steps each: this VM's speed drifts, and the
    minimum is the steadiest estimate of what a step itself costs."""
    for _ in range(20):  # warm-up: allocator, oneDNN kernels
        step()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        best = min(best, (time.perf_counter() - started) / repeats * 1e3)
    return best


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def profile(batch: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    teacher = torch.randn(batch, 10)
    out = {}
    for name, cast in (("plain fp32", False), ("plain bf16 autocast", True)):
        model = MLP(784, HIDDEN, 10)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, optimizer=optimizer, cast=cast):
            with autocast(cast):
                logits = model(x)
            loss, _ = kd_loss(logits.float(), teacher, y, 4.0, 0.7)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out[name] = ms_per_step(step, repeats)
    for precision, zero, reduce in (("bf16", 0, False), ("bf16", 1, True), ("fp32", 0, False),
                                    ("bf16_autocast", 0, False), ("bf16_autocast", 0, True),
                                    ("bf16_autocast", 1, True)):
        spec = parse_spec({
            "name": "profile", "data": {"kind": "digits"},
            "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
            "student": {"model": {"kind": "mlp", "hidden": HIDDEN}},
            "precision": precision, "deepspeed": {"zero_stage": zero},
        })
        engine = DistillEngine(MLP(784, HIDDEN, 10), spec, lr=1e-3, micro_batch=batch,
                               weight_decay=0.0, grad_clip=0.0, world_size=1)
        # one rank under ZeRO 0 skips DeepSpeed's gradient all-reduce; `reduce` puts it back, to
        # show its cost (ZeRO 1-2 always run it)
        engine.engine.enable_backward_allreduce = reduce

        def step(engine=engine):
            engine.train_step(x, y, teacher, 4.0, 0.7)

        label = f"deepspeed {precision} ZeRO {zero}"
        if reduce and zero == 0:
            label += " (one-rank all-reduce kept)"
        out[label] = ms_per_step(step, repeats)
        engine.prune_to(0.5)
        out[label + ", 50% pruned"] = ms_per_step(step, repeats)
    return out


def _all_reduce_worker(rank: int, port: int, numel: int, repeats: int, out) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    grads = torch.zeros(numel)
    for _ in range(20):
        dist.all_reduce(grads)
    started = time.perf_counter()
    for _ in range(repeats):
        dist.all_reduce(grads)
    if rank == 0:
        out.put((time.perf_counter() - started) / repeats * 1e3)
    dist.barrier()  # no rank tears the gloo pair down while its peer still uses it
    dist.destroy_process_group()


def all_reduce_ms(repeats: int) -> float:
    """ms for one gloo all-reduce of the student's fp32 gradients between two processes on this
    machine: what a second data-parallel worker adds to every step."""
    import torch.multiprocessing as mp

    numel = sum(p.numel() for p in MLP(784, HIDDEN, 10).parameters())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce_worker, args=(r, port, numel, repeats, out))
             for r in range(2)]
    for proc in procs:
        proc.start()
    ms = out.get(timeout=300)
    for proc in procs:
        proc.join()
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=60, help="steps per timing (5 timings)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with socket.socket() as s:  # a gloo group of one, as a single Ray Train worker has
        s.bind(("127.0.0.1", 0))
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(s.getsockname()[1])
    set_distributed_env(0, 0, 1, 1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    result = {"batch": args.batch, "threads": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        result["threads"][threads] = profile(args.batch, args.repeats)
    names = list(next(iter(result["threads"].values())))
    width = max(map(len, names))
    print(f"{'ms per step, batch ' + str(args.batch):<{width}}  " +
          "  ".join(f"{t} thread{'s' if t > 1 else ''}".rjust(9) for t in args.threads))
    for name in names:
        print(f"{name:<{width}}  " + "  ".join(f"{result['threads'][t][name]:9.2f}"
                                             for t in args.threads))
    dist.destroy_process_group()
    result["all_reduce_2_workers_ms"] = all_reduce_ms(args.repeats)
    print(f"gloo all-reduce of the student's gradients, 2 processes: "
          f"{result['all_reduce_2_workers_ms']:.2f} ms (added to every step by a second worker)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
