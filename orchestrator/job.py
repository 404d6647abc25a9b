"""The job driver: one compression job from spec to report, read top to bottom.

    stillhouse run examples/digits.yaml --run-dir runs/digits

Stages, each checkpointed under the run dir so that running the same spec with the same run dir
again resumes after the last finished one:

    1. teacher    train it (Ray Train + DeepSpeed) or load the file the spec names
    2. pool       start the teacher replicas; score the teacher on the test set through them
    3. student    one worker group: dense distillation, then every pruning round
    4. report     quantize and export the final student (orchestrator/compress.py); report.json,
                  plots, the final student's weights and masks, the printed tables
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import replace
from pathlib import Path

import numpy as np
import yaml

from specs import JobSpec, spec_hash
from specs.errors import InputError, JobError
from specs.job import TrainedTeacher

WORKERS_GONE_S = 120.0  # how long a new driver waits for an earlier run's workers to exit


class RunDirError(InputError):
    """The run dir cannot take this job: it holds another spec's run, or a running job."""


def run_job(
    spec: JobSpec, *, data_dir: str | None = None, run_dir: str | None = None,
    address: str | None = None, trusted_modules: tuple[str, ...] = (), verbose: bool = False,
) -> dict:
    """Run (or resume) one job; returns the report.

    Without `address` the job starts an embedded local Ray cluster; with one (`auto` inside a
    submitted job) it connects to that cluster. `trusted_modules` are the top-level packages
    whose code `python` models may run (with `STILLHOUSE_TRUSTED_MODULES`). Ray's and the
    workers' own output goes to `<run dir>/logs/` (and also to the console when `verbose`).
    """
    from cluster.local import check_machine, job_cluster
    from orchestrator.preflight import preflight
    from trainers.models import trusted_modules as trusted_from, trusted_package_dirs

    # everything that can be checked without Ray is checked before Ray starts or a file is written
    trusted = trusted_from(trusted_modules)
    if address is None:
        check_machine(spec)  # its CPUs and GPUs
    run_path = Path(run_dir or spec.run_dir or f"runs/{spec.name}").resolve()
    data_dir = _data_dir(run_path, data_dir)
    plan = preflight(spec, data_dir, trusted)
    py_modules = trusted_package_dirs(trusted) if trusted else []
    lock = _lock_run_dir(run_path)  # noqa: F841 (held until this process ends)
    digest = _claim_run_dir(spec, run_path)
    job_id = uuid.uuid4().hex[:12]
    _say(f"job {spec.name} ({job_id}), spec {digest}, run dir {run_path}")
    for warning in plan.warnings:
        _say(f"warning: {warning}")

    with job_cluster(spec, address, py_modules=py_modules, log_dir=run_path / "logs",
                     verbose=verbose):
        from trainers.tracking import Tracker, git_revision

        data = plan.data if plan.data is not None else _prepare(spec, data_dir, run_path, plan)
        _record_data(run_path, data_dir, data)
        ids = {"job_id": job_id, "spec_hash": digest, "git_revision": git_revision(),
               "ray_job_id": os.environ.get("RAY_JOB_ID") or None}
        tracker = Tracker.start(
            spec, run_path, job_type="driver", name=f"{spec.name}-driver",
            config={"spec": spec.model_dump(mode="json"), **ids},
        )
        given = (plan.teacher_blob, plan.teacher_model) if plan.teacher_blob else None
        try:
            if spec.language_model:  # text data, Hugging Face models: orchestrator/lm_job.py
                from orchestrator.lm_job import lm_stages

                report = lm_stages(spec, data, run_path, plan.teacher_model, tracker, ids,
                                   plan.warnings, fit=_fit, say=_say)
            else:
                report = _stages(spec, data, data_dir, run_path, given, tracker, ids, trusted,
                                 plan.warnings)
        except BaseException:
            tracker.finish(exit_code=1)
            raise
        tracker.finish()
    return report


DATA_RECORD = "data.json"  # in a run dir: where its data came from


def _data_dir(run_path: Path, given: str | None) -> str | None:
    """The data dir of this run: the one given (made absolute, since Ray workers start in other
    folders), else the one an earlier run of this run dir recorded. A given one that differs
    from the recorded one is said, and wins."""
    record = run_path / DATA_RECORD
    recorded = json.loads(record.read_text()).get("data_dir") if record.is_file() else None
    if given is None:
        if recorded:
            _say(f"data dir {recorded} (recorded by an earlier run of {run_path})")
        return recorded
    absolute = str(Path(given).resolve())
    if recorded and recorded != absolute:
        _say(f"warning: data dir {absolute} given; the earlier run of this run dir used "
             f"{recorded}")
    return absolute


def _record_data(run_path: Path, data_dir: str | None, data) -> None:
    """Remember the data source, so that `export`, `report` and a rerun need no flag again."""
    body = {"data_dir": data_dir, "prepared": getattr(data, "folder", None),
            "source": data.describe()}
    tmp = run_path / (DATA_RECORD + ".partial")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(run_path / DATA_RECORD)


def _prepare(spec: JobSpec, data_dir: str | None, run_path: Path, plan):
    """A streamed source's prepared copy: decoded now (a Ray Data job) unless an earlier job
    with the same source and preprocessing left it in the cache dir."""
    from trainers.image_sources import MANIFEST, prepare

    root = Path(spec.data.cache_dir or run_path.parent / "data-cache").resolve()
    folder = root / plan.listing.key
    if (folder / MANIFEST).is_file():
        _say(f"data: reusing the prepared copy {folder}")
        return prepare(spec.data, data_dir, root, plan.listing)
    started = time.perf_counter()
    _say(f"data: preparing {plan.listing.train_rows:,} + {plan.listing.test_rows:,} images "
         f"({spec.data.kind}) into {folder}")
    data = prepare(spec.data, data_dir, root, plan.listing)
    _say(f"data: prepared in {time.perf_counter() - started:.1f}s")
    return data


def _stages(spec, data, data_dir, run_path, given_teacher, tracker, ids, trusted,
            warnings) -> dict:
    from orchestrator.report import format_table, publish_report, student_report
    from orchestrator.stages import student_stage
    from trainers import checkpoint
    from trainers.models import count_params
    from trainers.plan import TEACHER_CHECKPOINT
    from trainers.teacher_pool import TeacherPool
    from trainers.teacher_server import load_teacher
    from trainers.worker import StageRequest, stage_tracker

    ckpt_root = run_path / "checkpoints"
    started = time.perf_counter()
    prepared = getattr(data, "folder", None)

    def request(stage: str, **extra) -> StageRequest:
        return StageRequest(spec.model_dump_json(), stage, str(run_path), data_dir,
                            prepared=prepared, trusted=tuple(sorted(trusted)),
                            wandb_config=ids, wandb_mode=tracker.mode, **extra)

    # 1. teacher ---------------------------------------------------------------------------
    if isinstance(spec.teacher, TrainedTeacher):
        if checkpoint.complete_checkpoints(ckpt_root, [TEACHER_CHECKPOINT]):
            _say("stage 1/4 teacher: done in an earlier run, skipped")
            stage_tracker(spec, run_path, "teacher", [TEACHER_CHECKPOINT], False, ids,
                          tracker.mode).finish()
        else:
            _say(f"stage 1/4 teacher: training {spec.teacher.model.kind} for "
                 f"{spec.teacher.epochs} epochs on {spec.resources.student_workers} workers")
            _fit(spec, run_path, request("teacher"))
        teacher_path = ckpt_root / TEACHER_CHECKPOINT / "model.safetensors"
        blob = teacher_path.read_bytes()
        teacher_model = load_teacher(spec.teacher, blob, data.image_shape, data.num_classes,
                                     trusted)
    else:
        _say(f"stage 1/4 teacher: loaded from {spec.teacher.path}")
        blob, teacher_model = given_teacher
        teacher_path = _keep_teacher_file(spec, run_path, blob)

    # 1b. logit cache (cached / topk modes, or online with `logits.cache_unaugmented`): the
    # teacher over the training set as stored, once ------------------------------------------
    logit_cache = None
    if spec.logit_cache_mode is not None:
        logit_cache = _logit_cache(spec, teacher_path, blob, data, run_path, trusted)

    # 2. teacher pool ----------------------------------------------------------------------
    shared = f" (shared pool {spec.resources.shared_pool})" if spec.resources.shared_pool else ""
    _say(f"stage 2/4 pool: {spec.resources.teacher_replicas} teacher replicas{shared}")
    pool = TeacherPool.start(spec, teacher_path, data.image_shape, data.num_classes, trusted)
    try:
        if data.streamed:
            teacher_logits = pool.predict_batches(data.test_batches())
        else:
            teacher_logits = pool.predict(data.x_test)
        y_test = np.concatenate([y for _, y in data.test_batches()])
        teacher = {
            "accuracy": float((teacher_logits.argmax(-1) == y_test).mean()),
            "params": count_params(teacher_model),
            "source": spec.teacher.kind,
        }
        _say(f"teacher accuracy {teacher['accuracy']:.4f} ({teacher['params']:,} params)")
        tracker.log({"teacher/accuracy": teacher["accuracy"], "teacher/params": teacher["params"]})
        # the workers read the cache, or need no teacher at all: the replicas' CPUs go to them
        # (online, they serve the augmented phases; a cache serves the others)
        serving = spec.replicas_beside_workers and (logit_cache is None
                                                    or spec.logits.mode == "online")
        if not serving:
            replica_stats = pool.stats()
            pool.shutdown()

        # 3. student: dense distillation and pruning rounds, one worker group --------------
        if spec.pruning.enabled:
            plan = (f"dense distillation, then {spec.pruning.rounds} pruning rounds to "
                    f"{spec.pruning.target_sparsity:.0%} sparsity")
        else:
            plan = "dense distillation (pruning disabled)"
        names = student_stage(spec, run_path, ids, tracker, _say, plan, lambda: _fit(
            spec, run_path, request("student", teacher_replicas=pool.replicas or None,
                                    logit_cache=logit_cache)))
        if serving:
            replica_stats = pool.stats()
    finally:
        pool.shutdown()

    # 4. report ----------------------------------------------------------------------------
    metas, report = student_report(spec.name, ids["spec_hash"], teacher, run_path, names)
    from orchestrator.compress import COMPRESSED_FILE, EXPORTED_PROGRAM, compress_and_export

    teacher["file_bytes"] = len(blob)
    report["data"] = data.describe()
    report["warnings"] = list(warnings) + [w for m in metas for w in m.get("warnings", [])]
    report.update(compress_and_export(spec, data, run_path, teacher, teacher_model, trusted))
    report["files"]["compressed"] = COMPRESSED_FILE
    report["files"]["exported_program"] = EXPORTED_PROGRAM
    report["wall_seconds"] = time.perf_counter() - started
    report["placement"] = {  # nodes of the teacher replicas and of the last phase's workers
        "teacher_nodes": [r["node_id"] for r in replica_stats],
        "student_nodes": [c.get("node_id") for c in metas[-1]["rank_checks"]],
    }
    (run_path / "report.json").write_text(json.dumps(report, indent=2))
    publish_report(report, run_path, tracker)
    for r in report["rounds"]:
        tracker.log({"round/accuracy": r["accuracy"], "round/sparsity": r["sparsity"],
                     "round/nonzero_params": r["nonzero_params"], "round/index": r["round"]})
    tracker.summary({"final/" + k: v for k, v in report["final"].items() if k != "layer_sparsity"})
    tracker.log_artifact(
        f"{spec.name}-student", "model",
        [run_path / "student.safetensors", run_path / "student-masks.safetensors",
         run_path / COMPRESSED_FILE, run_path / EXPORTED_PROGRAM, run_path / "report.json"],
        metadata={"spec_hash": ids["spec_hash"], **{k: report["final"][k] for k in
                  ("accuracy", "sparsity", "nonzero_params", "dense_params")},
                  **{f"export_{k}": report["export"][k] for k in
                     ("compressed_file_bytes", "dense_file_bytes", "bits", "accuracy")}},
    )
    _say("stage 4/4 report: " + str(run_path / "report.json"))
    for warning in report["warnings"]:
        _say(f"warning: {warning}")
    print(format_table(report), flush=True)
    return report


def _fit(spec: JobSpec, run_path: Path, request) -> None:
    """Run one worker group to the end of its stage; raise JobError if it failed."""
    from ray.train.torch import TorchTrainer

    from trainers.engine_config import ray_train_configs
    from trainers.lm_worker import lm_train_worker
    from trainers.worker import train_worker

    import ray

    from orchestrator.console import follow
    from trainers.progress import ProgressBoard

    scaling, run_config, torch_config = ray_train_configs(spec, run_path, request.stage)
    # the workers' progress, drawn here (their own output goes to the run dir's logs/)
    board = ray.remote(num_cpus=0)(ProgressBoard).remote()
    trainer = TorchTrainer(
        lm_train_worker if spec.language_model else train_worker,
        train_loop_config={"request": replace(request, progress=board)},
        scaling_config=scaling,
        run_config=run_config,
        torch_config=torch_config,
    )
    log = run_path / "logs" / "workers.log"
    try:
        with follow(board):
            result = trainer.fit()
    except Exception as err:  # Ray Train V2 raises TrainingFailedError after its retries
        raise JobError(f"the {request.stage} stage failed: {_first_line(err)} (the workers' "
                       f"output: {log})") from err
    finally:
        ray.kill(board)
    if getattr(result, "error", None) is not None:
        raise JobError(f"the {request.stage} stage failed: {_first_line(result.error)} (the "
                       f"workers' output: {log})")


def _logit_cache(spec: JobSpec, teacher_path: Path, blob: bytes, data, run_path: Path,
                 trusted: frozenset[str]) -> tuple[str, str]:
    """The (dir, key) of a complete cache for this teacher and data, filled now if missing."""
    from trainers.logit_cache import LogitCache, cache_key, fill_cache

    root = Path(spec.logits.cache_dir or run_path.parent / "logit-cache").resolve()
    key = cache_key(blob, data.fingerprint(), mode=spec.logit_cache_mode, top_k=spec.logits.top_k,
                    temperature=spec.distillation.temperature,
                    precision=spec.teacher_precision)
    if LogitCache.open(root, key, 1) is not None:
        _say(f"logit cache: reusing {root / key}")
    else:
        started = time.perf_counter()
        folder = fill_cache(spec, teacher_path, data, root, key, trusted)
        _say(f"logit cache: wrote {folder} ({data.train_rows:,} samples, "
             f"{spec.logit_cache_mode}) in {time.perf_counter() - started:.1f}s")
    return str(root), key


TEACHER_COPY = "teacher-file"  # in a run dir: the teacher file a `checkpoint` / `exported` job uses


def _keep_teacher_file(spec: JobSpec, run_path: Path, blob: bytes) -> Path:
    """A copy of the spec's teacher file in the run dir, made by the first run: the teacher
    replicas load it from there (restarts included, on storage every node sees), and a rerun
    whose file has changed since is refused rather than resumed with another teacher."""
    folder = run_path / TEACHER_COPY
    copy = folder / Path(spec.teacher.path).name
    digest = hashlib.sha256(blob).hexdigest()
    if copy.is_file():
        if hashlib.sha256(copy.read_bytes()).hexdigest() != digest:
            raise RunDirError(
                f"`teacher.path` {spec.teacher.path} has changed since the first run of "
                f"{run_path} (which trained with the copy in {copy}): use another --run-dir, or "
                "remove that one to start over")
        return copy
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (".partial-" + copy.name)
    tmp.write_bytes(blob)
    tmp.replace(copy)
    return copy


def _lock_run_dir(run_path: Path):
    """One job at a time in a run dir: a second `stillhouse run` there would train beside the
    first and race it to the same checkpoints."""
    from trainers.locks import RUN_LOCK, WORKERS_LOCK, LockHeld, exclusive_lock, wait_until_free

    run_path.mkdir(parents=True, exist_ok=True)
    try:
        lock = exclusive_lock(run_path / RUN_LOCK)
    except LockHeld as held:
        raise RunDirError(f"{run_path} is in use by a running job ({held}); wait for it to end "
                          "or stop it, or use another --run-dir") from None
    except OSError as err:  # e.g. ENOLCK: storage without file locks
        raise RunDirError(f"cannot lock {run_path / RUN_LOCK} ({err.strerror}); a run dir must "
                          "be on storage that supports file locks") from None
    # the workers of a driver killed a moment ago may still be finishing a phase there
    workers = run_path / WORKERS_LOCK
    if not wait_until_free(workers, timeout=1.0):
        _say("waiting for the workers of an earlier run of this run dir to exit")
        if not wait_until_free(workers, timeout=WORKERS_GONE_S):
            raise RunDirError(f"workers of an earlier run still hold {workers} after "
                              f"{WORKERS_GONE_S:.0f} s; stop them (`ray stop`) and run again")
    return lock


def _claim_run_dir(spec: JobSpec, run_path: Path) -> str:
    """Record the spec in the run dir, or check that it is the same spec as before."""
    digest = spec_hash(spec)
    marker = run_path / "spec.json"
    if marker.exists():
        previous = json.loads(marker.read_text()).get("spec_hash")
        if previous != digest:
            raise RunDirError(
                f"{run_path} holds a run of a different spec (hash {previous}, this one {digest}); "
                "use another --run-dir, or remove that one to start over"
            )
        return digest
    run_path.mkdir(parents=True, exist_ok=True)
    (run_path / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    marker.write_text(json.dumps({"spec_hash": digest, "name": spec.name}))
    return digest


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[-1] if "Traceback" in text else text.splitlines()[0]


def _say(message: str) -> None:
    from orchestrator.console import say

    say(message)
