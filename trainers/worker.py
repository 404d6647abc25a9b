"""The Ray Train worker function: one worker group trains the teacher, or the student through its
dense distillation and every pruning round, without restarting between rounds.

Each phase ends with an evaluation, a committed checkpoint under `<run_dir>/checkpoints/` and one
`ray.train.report` on every rank (equal report counts; unequal ones hang). A worker group that Ray
Train restarts after a failure finds the last committed checkpoint itself and continues after it.

A phase's W&B rows (every `log_every_steps` steps, and its evaluation) are committed with its
checkpoint and logged only after the commit, the way Ray Train reports metrics with their
checkpoint: a resumed run never logs a step a stopped run already logged, and logs the committed
rows a stopped run had no time to log. W&B shows a phase when it ends, not step by step.

Run by the job driver (orchestrator/job.py), never directly.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, replace
from itertools import repeat
from pathlib import Path
from typing import Literal

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from trainers.locks import WORKERS_LOCK, shared_lock
from trainers.tracking import METRICS_FILE, Tracker, committed_rows, is_logged, mark_logged
from specs.job import JobSpec
from trainers import checkpoint
from trainers.data import Dataset, Prefetcher, epoch_shard, load_dataset
from trainers.device import student_device
from trainers.engine import DistillEngine, set_distributed_env
from trainers.features import (
    KD_PREFIX, build_projections, check_feature_spec, split_teacher_output, student_only,
)
from trainers.logit_cache import LogitCache
from trainers.models import build_model
from trainers.plan import Phase, cosine_lr, student_phases, teacher_phases
from trainers.pruning import mask_digest, sparsity_stats
from trainers.teacher_pool import TeacherPoolClient


@dataclass(frozen=True)
class StageRequest:
    """What the driver asks one worker group to do (travels in `train_loop_config`)."""

    spec_json: str
    stage: Literal["teacher", "student"]
    run_dir: str
    data_dir: str | None
    teacher_replicas: list | None = None  # actor handles, student stage only
    logit_cache: tuple[str, str] | None = None  # (cache dir, key): read logits from the cache
    wandb_config: dict | None = None  # job id, spec hash: added to the W&B run config
    wandb_mode: str | None = None  # what the driver's run got (offline after a fallback)


def train_worker(config: dict) -> None:
    req: StageRequest = config["request"]
    spec = JobSpec.model_validate_json(req.spec_json)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = student_device(spec)  # the one device decision; the engine keeps it
    set_distributed_env(rank, ctx.get_local_rank(), world, ctx.get_local_world_size(), device)
    torch.set_num_threads(max(1, int(spec.resources.student_cpus)))

    student = req.stage == "student"
    section = spec.student if student else spec.teacher
    phases = student_phases(spec) if student else teacher_phases(spec)
    data = load_dataset(spec.data, req.data_dir, spec.seed)
    torch.manual_seed(spec.seed)  # the same initial weights on every rank
    model = build_model(section.model, data.image_shape, data.num_classes)
    teacher_shapes = None
    if student and spec.distillation.features:  # projections train with it
        student_shapes, teacher_shapes = check_feature_spec(spec, data.image_shape, data.num_classes)
        model.add_module(KD_PREFIX, build_projections(student_shapes, teacher_shapes))
    engine = DistillEngine(
        model, spec, lr=section.lr, micro_batch=section.batch_size,
        weight_decay=section.weight_decay, grad_clip=section.grad_clip,
        world_size=world, teacher_feature_shapes=teacher_shapes, device=device,
    )

    # held while this worker lives: a new driver for this run dir waits until it has gone
    workers_lock = shared_lock(Path(req.run_dir) / WORKERS_LOCK)  # noqa: F841
    root = Path(req.run_dir) / "checkpoints"
    done = checkpoint.complete_checkpoints(root, [p.name for p in phases])
    global_step = 0
    if done:
        global_step = _resume(engine, root, done[-1], world)
    todo = phases[len(done) :]

    tracker = Tracker(None)
    if rank == 0:
        tracker = stage_tracker(spec, Path(req.run_dir), req.stage, done, bool(todo),
                                req.wandb_config, req.wandb_mode, world_size=world)
    client = cache = source = None
    if student and req.logit_cache:
        cache = LogitCache.open(Path(req.logit_cache[0]), req.logit_cache[1],
                                spec.logits.max_shards_in_memory)
        if cache is None or cache.rows != len(data.y_train):
            raise RuntimeError(f"logit cache {req.logit_cache} is missing or does not fit the data")
    elif student:
        client = TeacherPoolClient(req.teacher_replicas, spec.resources.prefetch_batches)
        # once: teacher requests carry row indices into it, not the rows themselves; the worker
        # reads its batches from the same shared-memory copy
        source = ray.put(data.x_train)
        data = replace(data, x_train=ray.get(source))
    try:
        for phase in todo:
            global_step = _run_phase(
                engine, spec, phase, data, client, cache, source, tracker, root, rank, world,
                global_step, stage=req.stage, total_phases=len(phases),
            )
    finally:
        tracker.finish()


def _resume(engine: DistillEngine, root: Path, name: str, world: int) -> int:
    """Load the last committed checkpoint; returns the global step it was taken at."""
    from safetensors.torch import load_file

    folder = root / name
    meta = checkpoint.verify(folder)
    masks = load_file(str(folder / "masks.safetensors"))
    if meta["world_size"] == world:
        engine.load_deepspeed(str(folder / "deepspeed"), tag=name)
    else:  # ZeRO partitions do not fit another world size: weights only, fresh optimizer state
        weights = load_file(str(folder / "model.safetensors"))
        if (folder / "kd_proj.safetensors").exists():
            weights.update(load_file(str(folder / "kd_proj.safetensors")))
        engine.load_fp32_weights(weights)  # module and master copies (ZeRO 3: each rank's slices)
        _print0(f"[resume] {name} was written by {meta['world_size']} workers, now {world}: "
                "loading weights only (optimizer state starts fresh)")
    if masks:
        engine.set_masks(masks)
    _print0(f"[resume] continuing after checkpoint {name} (step {meta['global_step']})")
    return int(meta["global_step"])


def stage_tracker(
    spec: JobSpec, run_dir: Path, stage: str, done: list[str], training: bool,
    wandb_config: dict | None, mode: str | None, world_size: int | None = None,
) -> Tracker:
    """The stage's W&B run, which first logs the committed phases whose rows never reached W&B
    (the run that committed them was stopped before it logged them: the ledger has no mark); a
    no-op tracker when there is neither training nor such a phase. The driver calls it too, for
    a stage with nothing left to train."""
    root = run_dir / "checkpoints"
    unlogged = [name for name in done if not is_logged(root / name)]
    if not (training or unlogged):
        return Tracker(None)
    tracker = Tracker.start(
        spec, run_dir, job_type=f"{stage}-workers", name=f"{spec.name}-{stage}",
        config={"spec": spec.model_dump(mode="json"), "world_size": world_size,
                "resumed_after": done[-1] if done else None, **(wandb_config or {})},
        mode=mode,
    )
    rows = 0
    for name in unlogged:
        for step, row in committed_rows(root / name):
            tracker.log(row, step=step)
            rows += 1
        mark_logged(root / name, tracker.run_id)
    if rows:
        _print0(f"[resume] logged {rows} W&B rows of committed phases that the stopped run had "
                "not")
    return tracker


def _run_phase(
    engine: DistillEngine, spec: JobSpec, phase: Phase, data: Dataset,
    client: TeacherPoolClient | None, cache: LogitCache | None, source, tracker: Tracker,
    root: Path, rank: int, world: int, global_step: int, *, stage: str, total_phases: int,
) -> int:
    section = spec.student if stage == "student" else spec.teacher
    threshold = None
    base_lr = section.lr
    if phase.kind == "prune":
        threshold = engine.prune_to(phase.target_sparsity)
    elif phase.kind == "quantize":  # from here on the forward pass sees quantized weights
        from trainers.quantize import enable_fake_quant, layer_kinds

        enable_fake_quant(engine.module, layer_kinds(engine.module, spec.quantization.method),
                          engine.masks)
        base_lr = section.lr * spec.quantization.lr_scale
    steps_per_epoch = len(epoch_shard(len(data.y_train), section.batch_size, 0, spec.seed, rank, world))
    total_steps = phase.epochs * steps_per_epoch
    temperature = spec.distillation.temperature
    alpha = spec.distillation.alpha
    step_in_phase, skipped, samples, losses = 0, 0, 0, []
    overflows_before = engine.overflow_steps
    wandb_rows: dict[int, dict] = {}  # W&B rows by step, logged once the phase has committed
    started = time.perf_counter()
    for epoch in range(phase.epochs):
        epoch_start = time.perf_counter()
        batches = epoch_shard(
            len(data.y_train), section.batch_size, phase.index * 1000 + epoch, spec.seed, rank, world
        )
        epoch_losses = []
        with Prefetcher(_step_inputs(data, batches, cache, client, source, engine)) as inputs:
            for idx, x, y, t_logits, t_features in inputs:
                lr = cosine_lr(step_in_phase, total_steps, base_lr)
                engine.set_lr(lr)
                parts = engine.train_step(x, y, t_logits, temperature, alpha, t_features)
                step_in_phase += 1
                global_step += 1
                if parts is None:
                    skipped += 1
                    continue
                samples += len(idx) * world
                epoch_losses.append(parts["loss"])
                if global_step % spec.wandb.log_every_steps == 0:
                    rate = samples / max(1e-9, time.perf_counter() - started)
                    wandb_rows[global_step] = {
                        **{f"train/{k}": v for k, v in parts.items()}, "train/lr": lr,
                        "train/samples_per_s": rate, "train/phase": phase.index,
                    }
        losses += epoch_losses
        elapsed = time.perf_counter() - epoch_start
        _print0(
            f"[{stage}] {phase.name} ({phase.index + 1}/{total_phases}) epoch {epoch + 1}/"
            f"{phase.epochs}: loss {np.mean(epoch_losses) if epoch_losses else float('nan'):.4f}, "
            f"{len(batches) * section.batch_size * world / max(elapsed, 1e-9):,.0f} samples/s"
        )
    wall = time.perf_counter() - started

    accuracy = _evaluate(engine, data, rank, world)
    all_weights = engine.full_fp32_weights()  # collective under ZeRO: every rank calls it
    weights = student_only(all_weights)  # without feature-KD projections
    prunable = {n: weights[n] for n in engine.prunable}
    per_layer, prunable_nonzero, prunable_total = sparsity_stats(prunable)
    _, model_nonzero, model_total = sparsity_stats(weights)
    lp_bad, hp_bad = engine.masked_nonzero()
    checks = [None] * world
    dist.all_gather_object(
        checks, {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
                 "mask_digest": mask_digest(engine.masks) if engine.masks else None,
                 "masked_nonzero_module": lp_bad, "masked_nonzero_master": hp_bad}
    )
    meta = {
        "phase": phase.name, "phase_index": phase.index, "kind": phase.kind, "round": phase.round,
        "target_sparsity": phase.target_sparsity, "sparsity": 1.0 - prunable_nonzero / prunable_total,
        "threshold": threshold, "accuracy": accuracy,
        "train_loss": float(np.mean(losses)) if losses else None,
        "nonzero_params": model_nonzero, "dense_params": model_total,
        "prunable_nonzero": prunable_nonzero, "prunable_params": prunable_total,
        "layer_sparsity": per_layer, "global_step": global_step, "steps": step_in_phase,
        "skipped_nonfinite_steps": skipped,
        "skipped_overflow_steps": engine.overflow_steps - overflows_before,  # fp16 loss scaling
        "device": engine.device.type, "samples_per_s": samples / max(wall, 1e-9),
        "wall_seconds": wall, "world_size": world, "precision": spec.precision,
        "zero_stage": spec.deepspeed.zero_stage, "params": sum(w.numel() for w in weights.values()),
        "rank_checks": checks,
    }
    phase_metrics = {"eval/accuracy": accuracy}
    if stage == "student":
        phase_metrics.update({
            "prune/sparsity": meta["sparsity"], "prune/target_sparsity": phase.target_sparsity,
            "prune/round": phase.round, "prune/nonzero_params": model_nonzero,
        })
    wandb_rows[global_step] = {**wandb_rows.get(global_step, {}), **phase_metrics}
    _save(engine, root, phase.name, meta, all_weights, rank, wandb_rows)
    if rank == 0:  # committed: now they can go to W&B, and the ledger says so
        for step in sorted(wandb_rows):
            tracker.log(wandb_rows[step], step=step)
        mark_logged(root / phase.name, tracker.run_id)
    _print0(
        f"[{stage}] {phase.name} done: accuracy {accuracy:.4f}, sparsity {meta['sparsity']:.4f}, "
        f"{model_nonzero:,}/{model_total:,} nonzero, {wall:.1f}s"
    )
    ray.train.report({"phase": phase.name, "accuracy": accuracy, "sparsity": meta["sparsity"]})
    return global_step


def _step_inputs(
    data: Dataset, batches: list[np.ndarray], cache: LogitCache | None,
    client: TeacherPoolClient | None, source, engine: DistillEngine,
):
    """(indices, x, y, teacher logits, teacher features) per step, as tensors; run ahead of the
    steps by a `Prefetcher`. Teacher logits come from the logit cache, or from the pool (requests
    in flight, carrying only the row indices into `source`, the training inputs put into the
    object store once), or are None while the teacher itself trains."""
    if cache is not None:  # cached logits: no teacher in the loop at all
        teacher = ((cache.logits(idx), None) for idx in batches)
    elif client is not None:
        rows = client.stream_rows(source, batches, engine.spec.resources.teacher_request_rows)
        if engine.teacher_feature_shapes:  # each row: logits, then the features
            shapes = engine.teacher_feature_shapes
            teacher = (split_teacher_output(r, data.num_classes, shapes) for r in rows)
        else:
            teacher = ((r, None) for r in rows)
    else:
        teacher = repeat((None, None))
    for idx, (t_logits, t_features) in zip(batches, teacher):
        yield (
            idx, torch.from_numpy(data.x_train[idx]), torch.from_numpy(data.y_train[idx]),
            None if t_logits is None else torch.from_numpy(np.array(t_logits)),
            None if t_features is None else [torch.from_numpy(np.array(f)) for f in t_features],
        )


@torch.no_grad()
def _evaluate(engine: DistillEngine, data: Dataset, rank: int, world: int) -> float:
    """Test accuracy; each rank scores a contiguous slice and the counts are summed."""
    n = len(data.y_test)
    lo, hi = rank * n // world, (rank + 1) * n // world
    correct = 0
    for i in range(lo, hi, 1024):
        j = min(hi, i + 1024)
        pred = engine.predict(torch.from_numpy(data.x_test[i:j])).argmax(-1)
        correct += int((pred == torch.from_numpy(data.y_test[i:j])).sum())
    # on the backend's device: NCCL reduces CUDA tensors only
    total = torch.tensor([correct, hi - lo], dtype=torch.float64, device=engine.device)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _save(
    engine: DistillEngine, root: Path, name: str, meta: dict, weights: dict, rank: int,
    rows: dict[int, dict],
) -> None:
    """Commit one phase's checkpoint and its W&B rows; every rank takes part (DeepSpeed saves on
    all ranks)."""
    from safetensors.torch import save_file

    if rank == 0:
        checkpoint.begin(root, name)
    dist.barrier()
    staging = checkpoint.partial_path(root, name)
    engine.save_deepspeed(str(staging / "deepspeed"), tag=name)
    dist.barrier()
    if rank == 0:
        student = student_only(weights)
        save_file({k: v.contiguous() for k, v in student.items()}, str(staging / "model.safetensors"))
        if len(student) < len(weights):  # feature-KD projections, for a weights-only resume
            save_file({k: v.contiguous() for k, v in weights.items() if k not in student},
                      str(staging / "kd_proj.safetensors"))
        save_file({k: v.cpu().contiguous() for k, v in engine.masks.items()},
                  str(staging / "masks.safetensors"))
        (staging / METRICS_FILE).write_text(
            "".join(json.dumps({"step": k, "row": rows[k]}) + "\n" for k in sorted(rows)))
        checkpoint.commit(root, name, meta)
    dist.barrier()


def _print0(message: str) -> None:
    # sys.stdout, not print(): Ray Train patches print() in workers and, because Ray wraps
    # stdout, every printed line would reach the console twice.
    if not dist.is_initialized() or dist.get_rank() == 0:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
