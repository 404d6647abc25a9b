"""The Ray Train worker function of a language-model job: one worker group trains the teacher
(next-token cross-entropy), or the student through its dense distillation and every pruning
round, as trainers/worker.py does for image classifiers, with the same checkpoints, resume,
W&B ledger and per-epoch sample ledger (its helpers are used as they are).

What differs is the data and the teacher: each step takes (B, L) token blocks of the job's
prepared copy (trainers/text_data.py), their next-token labels (-100 at padding and at each
block's last position), and the teacher's top-k per token, (B, L, k) ids and log-probabilities
and (B, L) rest, either from the token cache by sample id or from the teacher replicas, whose
requests carry row indices into the blocks (put into the object store once). The engine's loss
is then the spec's token-level divergence (trainers/lm_losses.py) over non-padding tokens. A
phase ends with the test perplexity and next-token accuracy, and the tokens trained per second.

Run by the job driver (orchestrator/lm_job.py), never directly.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from specs.job import JobSpec
from trainers import checkpoint
from trainers.data import Prefetcher, epoch_shard, ids_multiset_hash
from trainers.device import student_device
from trainers.engine import DistillEngine, set_distributed_env
from trainers.lm_job import job_model
from trainers.lm_losses import IGNORE_INDEX, next_token_labels
from trainers.lm_teacher import pack_blocks, perplexity, token_scores, unpack_topk
from trainers.locks import WORKERS_LOCK, shared_lock
from trainers.progress import Progress
from trainers.plan import Phase, cosine_lr, student_phases, teacher_phases
from trainers.teacher_pool import TeacherPoolClient
from trainers.text_data import TextDataset
from trainers.token_cache import TokenCache
from trainers.tracking import Tracker
from trainers.worker import (
    StageRequest,
    _epoch_ledger,
    _resume,
    commit_phase,
    phase_state,
    stage_tracker,
)


def lm_train_worker(config: dict) -> None:
    req: StageRequest = config["request"]
    spec = JobSpec.model_validate_json(req.spec_json)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = student_device(spec)  # the one device decision; the engine keeps it
    set_distributed_env(rank, ctx.get_local_rank(), world, ctx.get_local_world_size(), device)
    torch.set_num_threads(max(1, int(spec.resources.worker_cpus(req.stage))))

    student = req.stage == "student"
    section = spec.student if student else spec.teacher
    phases = student_phases(spec) if student else teacher_phases(spec)
    data = TextDataset.open(req.prepared)
    root = Path(req.run_dir) / "checkpoints"
    done = checkpoint.complete_checkpoints(root, [p.name for p in phases])
    torch.manual_seed(spec.seed)  # the same initial weights on every rank
    model, init = job_model(spec, req.stage, Path(req.run_dir), resumed=bool(done))
    # rank 0's news reach the driver's console through the progress board, as for images
    progress = Progress(req.progress, rank, req.stage)
    if init is not None:
        progress.note(f"[{req.stage}] initialised from {init['teacher_dir']}: blocks {init['layers']}, "
                f"{init['copied']} tensors copied")
    engine = DistillEngine(
        model, spec, lr=section.lr, micro_batch=section.batch_size,
        weight_decay=section.weight_decay, grad_clip=section.grad_clip, world_size=world,
        device=device,
    )

    # held while this worker lives: a new driver for this run dir waits until it has gone
    workers_lock = shared_lock(Path(req.run_dir) / WORKERS_LOCK)  # noqa: F841
    global_step = _resume(engine, root, done[-1], world, progress) if done else 0
    todo = phases[len(done):]

    tracker = Tracker(None)
    if rank == 0:
        tracker = stage_tracker(spec, Path(req.run_dir), req.stage, done, bool(todo),
                                req.wandb_config, req.wandb_mode, world_size=world)
    client = cache = source = None
    if student and req.logit_cache:
        cache = TokenCache.open(Path(req.logit_cache[0]), req.logit_cache[1],
                                spec.logits.tokens.max_shards_in_memory)
        if cache is None or cache.rows != data.train_rows:
            raise RuntimeError(f"token cache {req.logit_cache} is missing or does not fit the data")
    elif student:
        client = TeacherPoolClient(req.teacher_replicas, spec.resources.prefetch_batches)
        # once: requests carry row indices into it (a (N, 2, L) int32 array of ids and masks)
        source = ray.put(pack_blocks(data.train.input_ids, data.train.attention_mask))
    try:
        for phase in todo:
            global_step = _run_phase(engine, spec, phase, data, client, cache, source, tracker,
                                     root, rank, world, global_step, stage=req.stage,
                                     total_phases=len(phases), init=init, progress=progress)
            init = None  # recorded with the first phase trained
    finally:
        tracker.finish()


def _run_phase(
    engine: DistillEngine, spec: JobSpec, phase: Phase, data: TextDataset,
    client: TeacherPoolClient | None, cache: TokenCache | None, source, tracker: Tracker,
    root: Path, rank: int, world: int, global_step: int, *, stage: str, total_phases: int,
    init: dict | None = None, progress: Progress,
) -> int:
    section = spec.student if stage == "student" else spec.teacher
    threshold = engine.prune_to(phase.target_sparsity) if phase.kind == "prune" else None
    batch_size = section.batch_size
    steps_per_epoch = len(epoch_shard(data.train_rows, batch_size, 0, spec.seed, rank, world))
    total_steps = phase.epochs * steps_per_epoch
    temperature, alpha = spec.distillation.temperature, spec.distillation.alpha
    step_in_phase, skipped, losses = 0, 0, []
    overflows_before = engine.overflow_steps
    tokens = 0  # this rank's predicted (non-padding) positions trained on
    ledger: list[dict] = []
    wandb_rows: dict[int, dict] = {}
    started = time.perf_counter()
    for epoch in range(phase.epochs):
        epoch_start = time.perf_counter()
        epoch_key = phase.index * 1000 + epoch
        batches = epoch_shard(data.train_rows, batch_size, epoch_key, spec.seed, rank, world)
        epoch_losses, epoch_samples, epoch_tokens, ids_hash = [], 0, 0, 0
        with Prefetcher(_step_inputs(data, batches, cache, client, source, spec)) as inputs:
            for idx, x, labels, teacher in inputs:
                epoch_samples += len(idx)
                ids_hash += ids_multiset_hash(idx)
                lr = cosine_lr(step_in_phase, total_steps, section.lr)
                engine.set_lr(lr)
                parts = engine.train_step(x, labels, teacher, temperature, alpha)
                step_in_phase += 1
                global_step += 1
                if parts is None:
                    skipped += 1
                    continue
                epoch_tokens += int((labels != IGNORE_INDEX).sum())
                epoch_losses.append(parts["loss"])
                if global_step % spec.wandb.log_every_steps == 0:
                    rate = (tokens + epoch_tokens) * world / max(1e-9, time.perf_counter() - started)
                    wandb_rows[global_step] = {
                        **{f"train/{k}": v for k, v in parts.items()}, "train/lr": lr,
                        "train/tokens_per_s": rate, "train/phase": phase.index,
                    }
        tokens += epoch_tokens
        losses += epoch_losses
        ledger.append(_epoch_ledger(epoch, epoch_samples, ids_hash, world))
        elapsed = time.perf_counter() - epoch_start
        progress.note(
            f"[{stage}] {phase.name} ({phase.index + 1}/{total_phases}) epoch {epoch + 1}/"
            f"{phase.epochs}: loss {np.mean(epoch_losses) if epoch_losses else float('nan'):.4f}, "
            f"{epoch_tokens * world / max(elapsed, 1e-9):,.0f} tokens/s"
        )
    wall = time.perf_counter() - started
    trained = torch.tensor([tokens], dtype=torch.float64, device=engine.device)
    dist.all_reduce(trained)  # every rank's tokens, not one rank's times the world size

    ppl, accuracy = perplexity(_evaluate(engine, data, rank, world, batch_size))
    all_weights, state = phase_state(engine, rank, world)
    model_nonzero, model_total = state["nonzero_params"], state["dense_params"]
    meta = {
        "phase": phase.name, "phase_index": phase.index, "kind": phase.kind, "round": phase.round,
        "target_sparsity": phase.target_sparsity, "threshold": threshold,
        "accuracy": accuracy, "perplexity": ppl,
        "train_loss": float(np.mean(losses)) if losses else None, **state,
        "global_step": global_step, "steps": step_in_phase,
        "skipped_nonfinite_steps": skipped,
        "skipped_overflow_steps": engine.overflow_steps - overflows_before,
        "device": engine.device.type,
        "train_tokens": int(trained.item()), "tokens_per_s": float(trained.item()) / max(wall, 1e-9),
        "samples_per_s": sum(e["samples"] for e in ledger) / max(wall, 1e-9),
        "wall_seconds": wall, "world_size": world, "precision": spec.precision,
        "zero_stage": spec.deepspeed.zero_stage, "params": model_total,
        "epochs": ledger, "seq_len": data.seq_len,
        "init": init,  # the student's blocks copied from the teacher (the first phase only)
    }
    phase_metrics = {"eval/perplexity": ppl, "eval/next_token_accuracy": accuracy,
                     "eval/tokens_per_s": meta["tokens_per_s"]}
    commit_phase(engine, root, phase, stage, meta, all_weights, phase_metrics, wandb_rows,
                 tracker, rank)
    progress.note(
        f"[{stage}] {phase.name} done: perplexity {ppl:.3f}, next-token accuracy "
        f"{accuracy:.4f}, sparsity {meta['sparsity']:.4f}, {model_nonzero:,}/{model_total:,} "
        f"nonzero, {meta['tokens_per_s']:,.0f} tokens/s, {wall:.1f}s"
    )
    ray.train.report({"phase": phase.name, "perplexity": ppl, "accuracy": accuracy,
                      "sparsity": meta["sparsity"]})
    return global_step


def _step_inputs(data: TextDataset, batches: list[np.ndarray], cache: TokenCache | None,
                 client: TeacherPoolClient | None, source, spec: JobSpec):
    """(ids, (input ids (B, L), attention mask (B, L)), labels (B, L), teacher top-k or None)
    per step, as tensors; run ahead of the steps by a `Prefetcher`. The top-k comes from the
    token cache by sample id, or from the replicas with requests in flight (row indices into
    `source`), or is None while the teacher itself trains."""
    def tensors(idx: np.ndarray):
        ids = torch.from_numpy(data.train.input_ids[idx].astype(np.int64))
        mask = torch.from_numpy(data.train.attention_mask[idx].astype(np.int64))
        return (ids, mask), next_token_labels(ids, mask)

    if cache is not None:
        for idx in batches:
            x, labels = tensors(idx)
            top = cache.topk(data.train.sample_ids[idx])
            yield idx, x, labels, tuple(torch.from_numpy(a) for a in top)
        return
    if client is None:
        for idx in batches:
            yield (idx, *tensors(idx), None)
        return
    waiting: deque = deque()  # batches sent to the pool, oldest first: answers come in order

    def requests():
        for idx in batches:
            waiting.append(idx)
            yield idx

    for answer in client.stream_rows(source, requests(), spec.resources.teacher_request_rows):
        idx = waiting.popleft()
        x, labels = tensors(idx)
        yield idx, x, labels, tuple(torch.from_numpy(a) for a in unpack_topk(answer))


@torch.no_grad()
def _evaluate(engine: DistillEngine, data: TextDataset, rank: int, world: int,
              batch_size: int) -> np.ndarray:
    """Summed (nll, correct, count) over the test blocks (`token_scores`): each rank scores its
    share and the sums are all-reduced. Every rank runs the same number of forwards (under ZeRO
    3 a forward gathers parameters from every rank); a rank out of blocks runs one block of a
    single token, which has no target and adds nothing."""
    n = data.test_rows
    lo, hi = rank * n // world, (rank + 1) * n // world
    steps = -(-(-(-n // world)) // batch_size)  # ceil(ceil(n / world) / batch)
    module = engine.module
    module.eval()
    total = np.zeros(3, dtype=np.float64)
    try:
        for step in range(steps):
            a, b = lo + step * batch_size, min(hi, lo + (step + 1) * batch_size)
            if a < b:
                ids = torch.from_numpy(data.test.input_ids[a:b].astype(np.int64))
                mask = torch.from_numpy(data.test.attention_mask[a:b].astype(np.int64))
            else:  # one real token (something to attend to), hence no target
                ids = torch.zeros(1, data.seq_len, dtype=torch.int64)
                mask = torch.zeros_like(ids)
                mask[:, 0] = 1
            total += token_scores(module, ids, mask)
    finally:
        module.train()
    summed = torch.from_numpy(total).to(engine.device)  # NCCL reduces device tensors only
    dist.all_reduce(summed)
    return summed.cpu().numpy()
