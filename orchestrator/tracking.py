"""Weights & Biases logging. The only module in stillhouse that imports wandb.

Mode `auto` logs online when `WANDB_API_KEY` is set and offline otherwise: offline runs are files
under `<run_dir>/wandb/` that `wandb sync` uploads later. (An online init with no network stalls
for about 90 s, so `auto` never tries online without a key.) The driver and rank 0 of every worker
group each own one run; all runs of a job share the spec's group. Workers log a phase's rows once
it has committed (trainers/worker.py), so the runs of a stopped job and of its resume hold each
step once; `orchestrator/wandb_file.py` reads the run files back.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from specs.job import JobSpec


def git_revision() -> str | None:
    """The stillhouse checkout's commit (a submitted job gets it through its environment)."""
    if os.environ.get("STILLHOUSE_GIT_REVISION"):
        return os.environ["STILLHOUSE_GIT_REVISION"]
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def resolve_mode(spec: JobSpec) -> str:
    mode = spec.wandb.mode
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    """One W&B run. With mode `disabled` every call does nothing, by the user's choice.

    An online run whose server cannot be reached within `wandb.init_timeout_s` falls back to
    offline logging (files that `wandb sync` uploads later) instead of failing or stalling the
    job; `mode` says which one the run got, and the driver hands it to the workers so that they
    do not wait for the unreachable server again.
    """

    def __init__(self, run=None, mode: str = "disabled"):
        self._run = run
        self.mode = mode

    @classmethod
    def start(
        cls, spec: JobSpec, run_dir: Path, *, job_type: str, name: str, config: dict,
        mode: str | None = None,
    ) -> "Tracker":
        mode = mode or resolve_mode(spec)
        if mode == "disabled":
            return cls(None)
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)

        def init(mode_: str):
            return wandb.init(
                project=spec.wandb.project,
                entity=spec.wandb.entity,
                group=spec.wandb.group or spec.name,
                job_type=job_type,
                name=name,
                dir=str(run_dir),
                mode=mode_,
                config=config,
                settings=wandb.Settings(
                    console="off",  # progress lines go to the job's own console, not W&B
                    x_disable_stats=True,  # no system-metrics sampler thread in a 2-core worker
                    silent=True,
                    init_timeout=spec.wandb.init_timeout_s,
                ),
                reinit="create_new",
            )

        if mode == "online":
            try:
                return cls(init("online"), "online")
            except Exception as err:  # wandb raises CommError, UsageError, ... when unreachable
                cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                sys.stdout.write(f"[stillhouse] W&B unreachable ({cause}); logging offline under "
                                 f"{run_dir / 'wandb'}; `wandb sync` uploads it later\n")
                sys.stdout.flush()
        return cls(init("offline"), "offline")

    @property
    def run_file(self) -> str | None:
        """Path of the run's `.wandb` log (offline runs)."""
        if self._run is None:
            return None
        return str(Path(self._run.dir).parent / f"run-{self._run.id}.wandb")

    def log(self, metrics: dict, step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def log_table(self, key: str, columns: list[str], rows: list[list]) -> None:
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_image(self, key: str, path: Path) -> None:
        self.log_images({key: path})

    def log_images(self, images: dict[str, Path]) -> None:
        """PNG files, in one history row."""
        if self._run is not None:
            import wandb

            self._run.log({key: wandb.Image(str(path)) for key, path in images.items()})

    def log_artifact(self, name: str, kind: str, files: list[Path], metadata: dict) -> None:
        """Files as one W&B artifact (offline runs keep it for `wandb sync`)."""
        if self._run is not None:
            import wandb

            artifact = wandb.Artifact(name=name, type=kind, metadata=metadata)
            for f in files:
                artifact.add_file(str(f))
            self._run.log_artifact(artifact)

    def summary(self, values: dict) -> None:
        if self._run is not None:
            for k, v in values.items():
                self._run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self._run is not None:
            self._run.finish(exit_code=exit_code)
            self._run = None
