"""The student stage as image and language-model jobs share it (orchestrator/job.py,
orchestrator/lm_job.py)."""

from __future__ import annotations

from pathlib import Path

from specs import JobSpec


def student_stage(spec: JobSpec, run_path: Path, ids: dict, tracker, say, plan: str,
                  fit_student) -> list[str]:
    """Stage 3, for image and language-model jobs: the student's phase names, after training
    those not committed yet (`fit_student()`, one worker group). Says what it does: `plan` on
    a first run, where it resumes, or that an earlier run did it all (whose W&B run then gets
    its summary and closes)."""
    from trainers import checkpoint
    from trainers.plan import student_phases
    from trainers.worker import stage_tracker

    names = [p.name for p in student_phases(spec)]
    done = checkpoint.complete_checkpoints(run_path / "checkpoints", names)
    if len(done) == len(names):
        say("stage 3/4 student: every phase done in an earlier run, skipped")
        stage_tracker(spec, run_path, "student", names, False, ids, tracker.mode).finish()
        return names
    if done:
        say(f"stage 3/4 student: resuming after {done[-1]} "
            f"({len(done)} of {len(names)} phases done)")
    else:
        say(f"stage 3/4 student: {plan}")
    fit_student()
    return names
