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
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist

from trainers.locks import WORKERS_LOCK, shared_lock
from trainers.tracking import METRICS_FILE, Tracker, committed_rows, is_logged, mark_logged
from specs.job import Augmentation, JobSpec
from trainers import checkpoint
from trainers.data import Prefetcher, epoch_shard, ids_multiset_hash, load_dataset
from trainers.device import student_device
from trainers.engine import DistillEngine, set_distributed_env
from trainers.features import (
    KD_PREFIX, build_projections, check_feature_spec, split_teacher_output, student_only,
)
from trainers.logit_cache import LogitCache
from trainers.models import build_model
from trainers.plan import Phase, cosine_lr, student_phases, teacher_phases
from trainers.progress import Progress
from trainers.pruning import mask_digest, sparsity_stats
from trainers.teacher_pool import TeacherPoolClient


@dataclass(frozen=True)
class StageRequest:
    """What the driver asks one worker group to do (travels in `train_loop_config`)."""

    spec_json: str
    stage: Literal["teacher", "student"]
    run_dir: str
    data_dir: str | None  # an in-memory source's data dir (absolute)
    prepared: str | None = None  # a streamed source's prepared copy (trainers/image_sources.py)
    trusted: tuple[str, ...] = ()  # packages whose code `python` models may run
    teacher_replicas: list | None = None  # actor handles, student stage only
    logit_cache: tuple[str, str] | None = None  # (cache dir, key): read logits from the cache
    wandb_config: dict | None = None  # job id, spec hash: added to the W&B run config
    wandb_mode: str | None = None  # what the driver's run got (offline after a fallback)
    progress: object | None = None  # the driver's ProgressBoard actor (trainers/progress.py)


def train_worker(config: dict) -> None:
    req: StageRequest = config["request"]
    spec = JobSpec.model_validate_json(req.spec_json)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = student_device(spec)  # the one device decision; the engine keeps it
    set_distributed_env(rank, ctx.get_local_rank(), world, ctx.get_local_world_size(), device)
    torch.set_num_threads(max(1, int(spec.resources.worker_cpus(req.stage))))
    if spec.deterministic:  # CPU kernels are; an op without a deterministic one only warns
        torch.use_deterministic_algorithms(True, warn_only=True)
        # torch would then also fill every new tensor's memory with NaN, a guard against reads
        # of uninitialised memory that costs a write per allocation (DeepSpeed allocates its
        # gradient buckets every step); nothing here reads memory it has not written
        torch.utils.deterministic.fill_uninitialized_memory = False

    student = req.stage == "student"
    section = spec.student if student else spec.teacher
    phases = student_phases(spec) if student else teacher_phases(spec)
    data = open_data(spec, req)
    trusted = frozenset(req.trusted)
    torch.manual_seed(spec.seed)  # the same initial weights on every rank
    model = build_model(section.model, data.image_shape, data.num_classes, trusted,
                        where=f"{req.stage}.model")
    teacher_shapes = None
    if student and spec.distillation.features:  # projections train with it
        student_shapes, teacher_shapes = check_feature_spec(spec, data.image_shape,
                                                            data.num_classes, trusted)
        model.add_module(KD_PREFIX, build_projections(student_shapes, teacher_shapes))
    engine = DistillEngine(
        model, spec, lr=section.lr, micro_batch=section.batch_size,
        weight_decay=section.weight_decay, grad_clip=section.grad_clip,
        world_size=world, teacher_feature_shapes=teacher_shapes,
        input_shape=data.image_shape if student else None, num_classes=data.num_classes,
        device=device,
    )

    # held while this worker lives: a new driver for this run dir waits until it has gone
    workers_lock = shared_lock(Path(req.run_dir) / WORKERS_LOCK)  # noqa: F841
    root = Path(req.run_dir) / "checkpoints"
    done = checkpoint.complete_checkpoints(root, [p.name for p in phases])
    progress = Progress(req.progress, rank, req.stage)
    global_step = 0
    if done:
        global_step = _resume(engine, root, done[-1], world, progress)
    todo = phases[len(done) :]

    tracker = Tracker(None)
    if rank == 0:
        tracker = stage_tracker(spec, Path(req.run_dir), req.stage, done, bool(todo),
                                req.wandb_config, req.wandb_mode, world_size=world)
    client = cache = source = None
    if student and req.logit_cache:  # the unaugmented phases' logits (all phases, cached modes)
        cache = LogitCache.open(Path(req.logit_cache[0]), req.logit_cache[1],
                                spec.logits.max_shards_in_memory)
        if cache is None or cache.rows != data.train_rows:
            raise RuntimeError(f"logit cache {req.logit_cache} is missing or does not fit the data")
    if student and spec.student_uses_teacher and spec.logits.mode == "online":
        client = TeacherPoolClient(req.teacher_replicas, spec.resources.prefetch_batches)
        if (cache is None and not data.streamed
                and not all(a.enabled for a in spec.student_augmentations)):
            # once: teacher requests carry row indices into it, not the rows themselves; the
            # worker reads its batches from the same shared-memory copy. (Augmented or streamed
            # batches exist only in the worker: their values travel with each request.)
            source = ray.put(data.x_train)
            data = replace(data, x_train=ray.get(source))
    try:
        for phase in todo:
            global_step = _run_phase(
                engine, spec, phase, data, client, cache, source, tracker, root, rank, world,
                global_step, stage=req.stage, total_phases=len(phases), progress=progress,
            )
    finally:
        tracker.finish()


def _resume(engine: DistillEngine, root: Path, name: str, world: int, progress: Progress) -> int:
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
        progress.note(f"[resume] {name} was written by {meta['world_size']} workers, now {world}: "
                      "loading weights only (optimizer state starts fresh)")
    if masks:
        engine.set_masks(masks)
    progress.note(f"[resume] continuing after checkpoint {name} (step {meta['global_step']})")
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
    engine: DistillEngine, spec: JobSpec, phase: Phase, data,
    client: TeacherPoolClient | None, cache: LogitCache | None, source, tracker: Tracker,
    root: Path, rank: int, world: int, global_step: int, *, stage: str, total_phases: int,
    progress: Progress,
) -> int:
    section = spec.student if stage == "student" else spec.teacher
    augment = spec.augmentation(stage, phase.kind)
    if augment.enabled:  # the teacher must see this phase's shifted rows, not the stored ones
        source = cache = None
    threshold = None
    base_lr = section.lr
    if phase.kind == "prune":
        threshold = engine.prune_to(phase.target_sparsity)
    elif phase.kind == "quantize":  # from here on the forward pass sees quantized weights
        from trainers.quantize import enable_fake_quant, layer_kinds, snap_shared_weights_

        kinds = layer_kinds(engine.module, spec.quantization.method, spec.quantization.bits)
        clusters = _weight_clusters(engine, kinds) if spec.quantization.method == "kmeans" else None
        enable_fake_quant(engine.module, kinds, engine.masks, clusters)
        if clusters:  # shared values from the start, and after every step
            snap = partial(snap_shared_weights_, engine.module, engine.master_fragment,
                           engine.masters_partitioned)
            snap()
            engine.after_step.append(snap)
        base_lr = section.lr * spec.quantization.lr_scale
    steps_per_epoch = epoch_steps(data, section.batch_size, spec.seed, rank, world)
    total_steps = phase.epochs * steps_per_epoch
    temperature = spec.distillation.temperature
    alpha = spec.distillation.alpha
    step_in_phase, skipped, samples, losses = 0, 0, 0, []
    ledger: list[dict] = []  # per epoch: samples trained on by all ranks and a hash of their ids
    overflows_before = engine.overflow_steps
    wandb_rows: dict[int, dict] = {}  # W&B rows by step, logged once the phase has committed
    started = time.perf_counter()
    for epoch in range(phase.epochs):
        epoch_start = time.perf_counter()
        epoch_key = phase.index * 1000 + epoch  # distinct per (phase, epoch): order, crops
        batches = training_batches(data, spec, section.batch_size, epoch_key, rank, world,
                                   augment)
        epoch_losses, epoch_samples, ids_hash = [], 0, 0
        with Prefetcher(_step_inputs(data, batches, cache, client, source, engine)) as inputs:
            for idx, x, y, t_logits, t_features in inputs:
                epoch_samples += len(idx)
                ids_hash += ids_multiset_hash(idx)
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
                rate = samples / max(1e-9, time.perf_counter() - started)
                progress.step(phase, step_in_phase, total_steps, parts["loss"], rate)
                if global_step % spec.wandb.log_every_steps == 0:
                    wandb_rows[global_step] = {
                        **{f"train/{k}": v for k, v in parts.items()}, "train/lr": lr,
                        "train/samples_per_s": rate, "train/phase": phase.index,
                    }
        losses += epoch_losses
        ledger.append(_epoch_ledger(epoch, epoch_samples, ids_hash, world))
        elapsed = time.perf_counter() - epoch_start
        progress.epoch(phase, total_phases, epoch,
                       float(np.mean(epoch_losses)) if epoch_losses else float("nan"),
                       epoch_samples * world / max(elapsed, 1e-9),
                       eta_s=(time.perf_counter() - started) / (epoch + 1) * (phase.epochs - epoch - 1))
    wall = time.perf_counter() - started

    engine.average_buffers()  # one set of BatchNorm statistics, from all workers' data
    accuracy = _evaluate(engine, data, rank, world)
    all_weights, state = phase_state(engine, rank, world)
    model_nonzero, model_total = state["nonzero_params"], state["dense_params"]
    per_layer = state["layer_sparsity"]
    meta = {
        "phase": phase.name, "phase_index": phase.index, "kind": phase.kind, "round": phase.round,
        "target_sparsity": phase.target_sparsity, "threshold": threshold, "accuracy": accuracy,
        "train_loss": float(np.mean(losses)) if losses else None, **state,
        "global_step": global_step, "steps": step_in_phase,
        "skipped_nonfinite_steps": skipped,
        "skipped_overflow_steps": engine.overflow_steps - overflows_before,  # fp16 loss scaling
        "device": engine.device.type, "samples_per_s": samples / max(wall, 1e-9),
        "wall_seconds": wall, "world_size": world, "precision": spec.precision,
        "zero_stage": spec.deepspeed.zero_stage, "params": model_total,
        "epochs": ledger,
        "warnings": _useless_layers(per_layer, phase),
        "augment": augment.model_dump(),  # what this phase trained on
        # where its teacher logits came from: the logit cache, the replicas, or none at all
        "teacher_logits": "cache" if cache is not None else "replicas" if client else None,
        "threads": torch.get_num_threads(),  # the stage's CPUs per worker (`worker_cpus`)
    }
    phase_metrics = {"eval/accuracy": accuracy}
    commit_phase(engine, root, phase, stage, meta, all_weights, phase_metrics, wandb_rows,
                 tracker, rank)
    progress.phase_done(phase, accuracy, meta["sparsity"], model_nonzero, model_total, wall,
                        meta["warnings"])
    ray.train.report({"phase": phase.name, "accuracy": accuracy, "sparsity": meta["sparsity"]})
    return global_step


def commit_phase(engine, root: Path, phase: Phase, stage: str, meta: dict, all_weights: dict,
                 phase_metrics: dict, wandb_rows: dict, tracker: Tracker, rank: int) -> None:
    """A phase's end: its evaluation (and, for the student, pruning figures) joins the W&B rows
    of its last step, the checkpoint is committed on every rank, and only then do the rows go to
    W&B, once (the ledger beside the checkpoint says they did)."""
    if stage == "student":
        phase_metrics = {**phase_metrics, "prune/sparsity": meta["sparsity"],
                         "prune/target_sparsity": phase.target_sparsity,
                         "prune/round": phase.round, "prune/nonzero_params": meta["nonzero_params"]}
    step = meta["global_step"]
    wandb_rows[step] = {**wandb_rows.get(step, {}), **phase_metrics}
    _save(engine, root, phase.name, meta, {**all_weights, **engine.buffers_fp32()}, rank,
          wandb_rows)
    if rank == 0:  # committed: now they can go to W&B, and the ledger says so
        for row_step in sorted(wandb_rows):
            tracker.log(wandb_rows[row_step], step=row_step)
        mark_logged(root / phase.name, tracker.run_id)


def phase_state(engine, rank: int, world: int) -> tuple[dict, dict]:
    """At a phase's end, on every rank (a collective under ZeRO): all fp32 weights and the
    phase record's figures of them: sparsity of the prunable weights and per layer, nonzero and
    dense parameter counts of the student, and each rank's mask digest and leaks (no masked
    weight may be nonzero on the module or on DeepSpeed's master copy)."""
    all_weights = engine.full_fp32_weights()
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
    return all_weights, {
        "sparsity": 1.0 - prunable_nonzero / prunable_total,
        "nonzero_params": model_nonzero, "dense_params": model_total,
        "prunable_nonzero": prunable_nonzero, "prunable_params": prunable_total,
        "layer_sparsity": per_layer, "rank_checks": checks,
    }


def _useless_layers(per_layer: dict[str, float], phase: Phase) -> list[str]:
    """Warnings for layers the round left without a weight: the model then predicts from
    nothing that passes through them (a constant, for a layer every path crosses)."""
    empty = [name for name, sparsity in per_layer.items() if sparsity >= 1.0]
    if not empty or phase.kind == "dense":
        return []
    return [f"{phase.name}: {len(empty)} layer(s) have no weight left at target sparsity "
            f"{phase.target_sparsity:.4f}: {empty[:5]}; lower `pruning.target_sparsity` or "
            "exclude them in `pruning.layers`"]


def _epoch_ledger(epoch: int, samples: int, ids_hash: int, world: int) -> dict:
    """What all ranks trained on in one epoch: the sample count and `ids_multiset_hash` of the
    ids, summed over ranks. Equal to the hash of the training set's ids (and the count to its
    size) exactly when every sample was seen once. Collective: every rank calls it."""
    parts = [None] * world
    dist.all_gather_object(parts, (samples, ids_hash))
    return {"epoch": epoch, "samples": sum(n for n, _ in parts),
            "ids_hash": f"{sum(h for _, h in parts) % (1 << 64):016x}"}


def _weight_clusters(engine: DistillEngine, kinds: dict[str, str]) -> dict[str, torch.Tensor]:
    """Weight sharing's cluster codes, fixed for the phase: k-means of the phase's starting fp32
    weights, which are those of the last committed checkpoint, so a restarted worker group, which
    redoes the phase from that checkpoint, clusters the same weights the same way (nothing extra
    is stored). Every rank computes them; rank 0's are broadcast, so that they are identical by
    construction."""
    from trainers.quantize import weight_clusters

    weights = engine.full_fp32_weights([f"{name}.weight" for name in kinds])  # collective
    clusters = weight_clusters(weights, kinds, engine.masks)
    if dist.is_initialized():
        for codes in clusters.values():
            dist.broadcast(codes, src=0)
    return clusters


def open_data(spec: JobSpec, req: StageRequest):
    """The job's data in this worker: an in-memory source loaded again (it is small), or a
    streamed source's prepared copy, which the worker reads shard by shard."""
    if req.prepared is not None:
        from trainers.image_sources import StreamedData

        return StreamedData.open(Path(req.prepared))
    return load_dataset(spec.data, req.data_dir, spec.seed)


def epoch_steps(data, batch_size: int, seed: int, rank: int, world: int) -> int:
    """Steps each rank takes per epoch (the same on every rank, or a collective would hang)."""
    if data.streamed:
        from trainers.image_sources import steps_per_epoch

        return steps_per_epoch(data.train_rows, world, batch_size)
    return len(epoch_shard(data.train_rows, batch_size, 0, seed, rank, world))


def training_batches(data, spec: JobSpec, batch_size: int, epoch_key: int, rank: int,
                     world: int, augment: Augmentation):
    """This rank's (sample ids, x (B, C, H, W) float32 numpy, y) batches of one epoch, augmented
    as `augment` (the stage's: `JobSpec.augmentation`) says; in the student's stage the teacher
    then sees the same augmented batch."""
    if data.streamed:
        raw = data.epoch_batches(batch_size, epoch_key, spec.seed, rank, world,
                                 spec.data.shuffle_buffer_rows)
        batches = (data.normalized(b) for b in raw)
    else:
        batches = ((idx, data.x_train[idx], data.y_train[idx]) for idx in
                   epoch_shard(data.train_rows, batch_size, epoch_key, spec.seed, rank, world))
    if not augment.enabled:
        yield from batches
        return
    from trainers.data import augment_batch

    for ids, x, y in batches:
        x = augment_batch(torch.from_numpy(np.ascontiguousarray(x)), ids, spec.seed, epoch_key,
                          augment.random_crop_padding, augment.hflip, data.pad_value)
        yield ids, x.numpy(), y


def _step_inputs(data, batches, cache: LogitCache | None, client: TeacherPoolClient | None,
                 source, engine: DistillEngine):
    """(ids, x, y, teacher logits, teacher features) per step, as tensors; run ahead of the
    steps by a `Prefetcher`. Teacher logits come from the logit cache (by sample id), or from
    the pool with requests in flight: carrying only row indices into `source` (an in-memory
    training set put into the object store once) when there is one, else the batch's values;
    or they are None while the teacher itself trains."""
    from collections import deque

    if cache is not None:  # cached logits: no teacher in the loop at all
        for ids, x, y in batches:
            yield (ids, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
                   torch.from_numpy(cache.logits(ids)), None)
        return
    if client is None:  # the teacher's own training, or a student trained alone: labels only
        for ids, x, y in batches:
            yield ids, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), None, None
        return
    waiting: deque = deque()  # batches sent to the pool, oldest first: answers come in order

    def requests(what: int):
        for batch in batches:
            waiting.append(batch)
            yield batch[what]

    if source is not None:
        answers = client.stream_rows(source, requests(0), engine.spec.resources.teacher_request_rows)
    else:
        answers = client.stream(requests(1))
    shapes = engine.teacher_feature_shapes
    for answer in answers:
        ids, x, y = waiting.popleft()
        if shapes:  # each row: logits, then the features
            t_logits, t_features = split_teacher_output(answer, data.num_classes, shapes)
            features = [torch.from_numpy(np.array(f)) for f in t_features]
        else:
            t_logits, features = answer, None
        yield (ids, torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y),
               torch.from_numpy(np.array(t_logits)), features)


@torch.no_grad()
def _evaluate(engine: DistillEngine, data, rank: int, world: int) -> float:
    """Test accuracy; each rank scores its share of the test set and the counts are summed."""
    if data.streamed:
        batches = data.eval_batches(rank, world)
    else:
        n = data.test_rows
        lo, hi = rank * n // world, (rank + 1) * n // world
        batches = ((data.x_test[i:min(hi, i + 1024)], data.y_test[i:min(hi, i + 1024)])
                   for i in range(lo, hi, 1024))
    correct = seen = 0
    for x, y in batches:
        pred = engine.predict(torch.from_numpy(np.ascontiguousarray(x))).argmax(-1)
        correct += int((pred == torch.from_numpy(y)).sum())
        seen += len(y)
    # on the backend's device: NCCL reduces CUDA tensors only
    total = torch.tensor([correct, seen], dtype=torch.float64, device=engine.device)
    dist.all_reduce(total)
    return float(total[0] / total[1])


def _save(
    engine: DistillEngine, root: Path, name: str, meta: dict, weights: dict, rank: int,
    rows: dict[int, dict],
) -> None:
    """Commit one phase's checkpoint and its W&B rows; every rank takes part (DeepSpeed saves on
    all ranks). `weights`: the full fp32 state (parameters and buffers) that model.safetensors
    holds, as a model built from the spec loads it."""
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
