"""Weights & Biases logging. The only module in stillhouse that imports wandb.

Mode `auto` logs online when `WANDB_API_KEY` is set and offline otherwise: offline runs are files
under `<run_dir>/wandb/` that `wandb sync` uploads later. (An online init with no network stalls
for about 90 s, so `auto` never tries online without a key.) The driver and rank 0 of every worker
group each own one run; all runs of a job share the spec's group. Workers log a phase's rows once
it has committed (trainers/worker.py), so the runs of a stopped job and of its resume hold each
step once: the W&B ledger below says which committed phases have reached W&B. (The tests read the
run files back with `tests/wandb_file.py`; the job itself never parses wandb's files.)
"""

from __future__ import annotations

import os
import sys
import json
from pathlib import Path

from specs.job import JobSpec

# ------------------------------------------------------------------------------- the ledger

METRICS_FILE = "metrics.jsonl"  # in a checkpoint: the phase's W&B rows, committed with it
LEDGER_FILE = "wandb-logged.json"  # in a checkpoint: written once those rows went to W&B


def committed_rows(folder: Path) -> list[tuple[int, dict]]:
    """(step, row) of the W&B rows a committed phase holds (verified with its checkpoint)."""
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    return [(r["step"], r["row"]) for r in map(json.loads, path.read_text().splitlines())]


def is_logged(folder: Path) -> bool:
    return (Path(folder) / LEDGER_FILE).is_file()


def mark_logged(folder: Path, run_id: str | None) -> None:
    """Record that a committed phase's rows were handed to W&B (by the run `run_id`).

    Written after `Tracker.log` returned: a process killed between the two leaves the phase
    unmarked, and the next run of the job logs its rows again (a duplicate, never a gap).
    The ledger sits beside the checkpoint's manifest, not in it: the checkpoint stays sealed.
    """
    path = Path(folder) / LEDGER_FILE
    tmp = path.with_name(LEDGER_FILE + ".partial")
    with open(tmp, "w") as f:
        json.dump({"run_id": run_id}, f)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)



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
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

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
        """Files as one W&B artifact (offline runs keep it for `wandb sync`); a directory
        goes in whole, under its own name (a Hugging Face model directory)."""
        if self._run is not None:
            import wandb

            artifact = wandb.Artifact(name=name, type=kind, metadata=metadata)
            for f in files:
                if Path(f).is_dir():
                    artifact.add_dir(str(f), name=Path(f).name)
                else:
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
