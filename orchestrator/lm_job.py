"""The stages of a language-model job, read top to bottom (what `run_job` runs for a spec with
`data.kind: text`, after the same preflight, run-dir lock and cluster as any job):

    1. teacher    train the causal LM (Ray Train + DeepSpeed, next-token cross-entropy) and
                  write it as a Hugging Face directory in the run dir, or use the `checkpoint`
                  directory the spec names (its digest is recorded: a changed directory is
                  refused on a rerun)
    2. pool       teacher replicas that answer the top-k per token; the teacher's test
                  perplexity and next-token accuracy through them
       2b. cache  `logits.mode: topk`: the top-k token cache, filled by the replicas shard by
                  shard (a fill that was killed resumes after its last finished shard)
    3. student    one worker group: dense token-level distillation, then every pruning round
    4. report     `student-hf/` (and `student-int8/`) loaded back and checked
                  (trainers/lm_export.py); report.json, plots, the printed tables

Each stage and phase is committed under the run dir, so a rerun resumes after the last one.
The driver's console lines and the worker group runs come from orchestrator/job.py (`say`,
`fit`), which hands them in.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from specs import JobSpec
from specs.errors import InputError
from specs.job import TrainedTeacher

TEACHER_RECORD = "teacher-dir.json"  # in a run dir: the checkpoint teacher's directory and digest


class TeacherChangedError(InputError):
    """The teacher directory of a `checkpoint` teacher changed since the run dir's first run."""


def lm_stages(spec: JobSpec, data, run_path: Path, teacher_model, tracker, ids: dict,
              warnings: list[str], *, fit, say) -> dict:
    """Run (or resume) stages 1-4 of a language-model job; returns the report. `data` is the
    preflight's TextDataset, `teacher_model` its teacher (for its parameter count), `fit(spec,
    run_path, request)` runs one worker group to the end of its stage, `say` prints a line."""
    from orchestrator.report import (
        format_table, language_model_report, publish_report, student_report,
    )
    from trainers import checkpoint
    from trainers.hf_models import model_dir_digest
    from trainers.lm_export import INT8_DIR, STUDENT_DIR, export_language_model
    from trainers.lm_job import (
        TEXT_DATA, cache_settings, logits_width, teacher_dir, teacher_scores_from_pool,
        write_trained_teacher,
    )
    from trainers.lm_teacher import (
        LMTeacherReplica, bytes_per_position, perplexity, server_fingerprint,
    )
    from trainers.models import count_params
    from orchestrator.stages import student_stage
    from trainers.plan import TEACHER_CHECKPOINT
    from trainers.teacher_pool import TeacherPool
    from trainers.worker import StageRequest, stage_tracker

    ckpt_root = run_path / "checkpoints"
    started = time.perf_counter()
    data = data.save(run_path / TEXT_DATA)  # the workers map this copy of the token blocks
    vocab = logits_width(teacher_model)

    def request(stage: str, **extra) -> StageRequest:
        return StageRequest(spec.model_dump_json(), stage, str(run_path), None,
                            prepared=data.folder, wandb_config=ids, wandb_mode=tracker.mode,
                            **extra)

    # 1. teacher ---------------------------------------------------------------------------
    if isinstance(spec.teacher, TrainedTeacher):
        if checkpoint.complete_checkpoints(ckpt_root, [TEACHER_CHECKPOINT]):
            say("stage 1/4 teacher: done in an earlier run, skipped")
            stage_tracker(spec, run_path, "teacher", [TEACHER_CHECKPOINT], False, ids,
                          tracker.mode).finish()
        else:
            say(f"stage 1/4 teacher: training hf causal LM for {spec.teacher.epochs} epochs on "
                f"{spec.resources.student_workers} workers")
            fit(spec, run_path, request("teacher"))
        folder = write_trained_teacher(spec, run_path, data, ckpt_root / TEACHER_CHECKPOINT)
    else:
        folder = teacher_dir(spec, run_path)
        say(f"stage 1/4 teacher: loaded from {folder}")
    digest = _teacher_digest(spec, run_path, folder, model_dir_digest(folder))

    # 2. teacher pool ----------------------------------------------------------------------
    tokens = cache_settings(spec, vocab)
    shared = f" (shared pool {spec.resources.shared_pool})" if spec.resources.shared_pool else ""
    say(f"stage 2/4 pool: {spec.resources.teacher_replicas} teacher replicas{shared}, top-"
        f"{tokens.k} per token ({bytes_per_position(tokens.k)} bytes per position on the wire)")
    fingerprint = server_fingerprint(digest, spec.teacher_precision, tokens.k,
                                     spec.distillation.temperature)
    pool = TeacherPool.launch(spec, LMTeacherReplica, (spec.model_dump_json(), str(folder), digest),
                              fingerprint, vocab)
    cache = cache_info = None
    try:
        teacher_ppl, teacher_acc = perplexity(
            teacher_scores_from_pool(pool.replicas, data, spec.student.batch_size))
        teacher = {"perplexity": teacher_ppl, "accuracy": teacher_acc,
                   "params": count_params(teacher_model), "source": spec.teacher.kind,
                   "file_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
                   "dir": str(folder)}
        say(f"teacher perplexity {teacher_ppl:.3f}, next-token accuracy {teacher_acc:.4f} "
            f"({teacher['params']:,} params)")
        tracker.log({"teacher/perplexity": teacher_ppl, "teacher/next_token_accuracy":
                     teacher_acc, "teacher/params": teacher["params"]})

        # 2b. token cache (topk mode): the teacher's top-k over the training blocks, once --
        if spec.logits.mode == "topk":
            cache, cache_info = _token_cache(spec, pool, data, run_path, digest, vocab, say)
            replica_stats = pool.stats()
            pool.shutdown()  # the workers read the cache: the replicas' CPUs go to them
            tracker.log({"cache/bytes_per_token": cache_info["bytes_per_token"],
                         "cache/file_bytes": cache_info["file_bytes"]})

        # 3. student: dense distillation and pruning rounds, one worker group --------------
        if spec.pruning.enabled:
            plan = (f"dense token-level distillation ({spec.distillation.kind}), then "
                    f"{spec.pruning.rounds} pruning rounds to "
                    f"{spec.pruning.target_sparsity:.0%} sparsity")
        else:
            plan = f"dense token-level distillation ({spec.distillation.kind}; pruning disabled)"
        names = student_stage(spec, run_path, ids, tracker, say, plan, lambda: fit(
            spec, run_path, request("student", teacher_replicas=pool.replicas, logit_cache=cache)))
        if cache is None:
            replica_stats = pool.stats()
    finally:
        pool.shutdown()

    # 4. report ----------------------------------------------------------------------------
    metas, report = student_report(spec.name, ids["spec_hash"], teacher, run_path, names)
    language_model_report(report, metas)
    report["data"] = data.describe()
    report["warnings"] = list(warnings) + [w for m in metas for w in m.get("warnings", [])]
    report["logits"] = {"mode": spec.logits.mode, "k": tokens.k,
                        "wire_bytes_per_position": bytes_per_position(tokens.k)}
    report["token_cache"] = cache_info
    report.update(export_language_model(spec, data, run_path, teacher))
    report["files"]["hf_dir"] = STUDENT_DIR
    if "int8" in report["export"]:
        report["files"]["int8_dir"] = INT8_DIR
    report["wall_seconds"] = time.perf_counter() - started
    report["placement"] = {
        "teacher_nodes": [r["node_id"] for r in replica_stats],
        "student_nodes": [c.get("node_id") for c in metas[-1]["rank_checks"]],
    }
    (run_path / "report.json").write_text(json.dumps(report, indent=2))
    publish_report(report, run_path, tracker)
    tracker.log_table("report/lm_stages", ["stage", "perplexity", "next_token_accuracy",
                                            "file_bytes", "nonzero_params", "bits"],
                      [[s["name"], s["perplexity"], s["accuracy"], s.get("file_bytes"),
                        s.get("nonzero_params"), s.get("bits")] for s in report["stages"]])
    for r in report["rounds"]:
        tracker.log({"round/perplexity": r["perplexity"], "round/accuracy": r["accuracy"],
                     "round/sparsity": r["sparsity"], "round/nonzero_params": r["nonzero_params"],
                     "round/index": r["round"]})
    final = report["final"]
    tracker.summary({"final/" + k: v for k, v in final.items() if k != "layer_sparsity"})
    files = [run_path / "student.safetensors", run_path / "student-masks.safetensors",
             run_path / "report.json", run_path / STUDENT_DIR]
    if "int8" in report["export"]:
        files.append(run_path / INT8_DIR)
    tracker.log_artifact(
        f"{spec.name}-student", "model", files,
        metadata={"spec_hash": ids["spec_hash"], "perplexity": final["perplexity"],
                  **{k: final[k] for k in ("accuracy", "sparsity", "nonzero_params",
                                           "dense_params")},
                  "hf_dir_bytes": report["export"]["file_bytes"],
                  **({"int8_dir_bytes": report["export"]["int8"]["file_bytes"]}
                     if "int8" in report["export"] else {})},
    )
    say("stage 4/4 report: " + str(run_path / "report.json"))
    for warning in report["warnings"]:
        say(f"warning: {warning}")
    print(format_table(report), flush=True)
    return report


def _teacher_digest(spec: JobSpec, run_path: Path, folder: Path, digest: str) -> str:
    """The teacher directory's digest, recorded by the first run of a run dir; a `checkpoint`
    teacher whose directory changed since is refused (the run would resume with another
    teacher). The directory is not copied: a Hugging Face model can be large."""
    record = run_path / TEACHER_RECORD
    if record.is_file():
        before = json.loads(record.read_text())
        if before["digest"] != digest:
            raise TeacherChangedError(
                f"the teacher directory {folder} has changed since the first run of {run_path} "
                "(its config or weights differ): use another --run-dir, or remove that one to "
                "start over")
        return digest
    tmp = record.with_name(TEACHER_RECORD + ".partial")
    tmp.write_text(json.dumps({"path": str(folder), "digest": digest,
                               "kind": spec.teacher.kind}))
    tmp.replace(record)
    return digest


def _token_cache(spec: JobSpec, pool, data, run_path: Path, digest: str, vocab: int,
                 say) -> tuple[tuple[str, str], dict]:
    """The (dir, key) of a complete token cache for this teacher and data, filled now (or
    finished, after a killed fill) by the replicas; and what the report says of it."""
    from trainers.lm_job import fill_token_cache_from_pool, token_cache_key_for
    from trainers.token_cache import TokenCache

    root = Path(spec.logits.tokens.cache_dir or run_path.parent / "logit-cache").resolve()
    key = token_cache_key_for(spec, digest, data, vocab)
    reused = TokenCache.open(root, key, 1) is not None
    started = time.perf_counter()
    if not reused and (root / f".partial-{key}").is_dir():
        say(f"token cache: resuming the fill of {root / key}")
    folder, stats = fill_token_cache_from_pool(spec, pool.client(), data, root, key, vocab, digest)
    seconds = time.perf_counter() - started
    if reused:
        say(f"token cache: reusing {folder}")
    else:
        say(f"token cache: wrote {folder} ({stats.computed} of {stats.shards} shards computed, "
            f"{stats.positions:,} positions, {stats.bytes_per_token} bytes per token) in "
            f"{seconds:.1f}s")
    info = {"dir": str(folder), "key": key, "shards": stats.shards, "computed": stats.computed,
            "reused": stats.reused, "positions": stats.positions,
            "bytes_per_token": stats.bytes_per_token, "file_bytes": stats.file_bytes,
            "file_bytes_per_token": stats.file_bytes / max(1, stats.positions),
            "k": min(spec.logits.tokens.k, vocab), "seconds": seconds}
    return (str(root), key), info
