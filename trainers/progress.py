"""Progress of a worker group, reported to the driver as events, not as printed lines.

Workers print to their own logs (the run dir's `logs/workers.log`, through Ray's log
forwarding); what the user sees on the console is drawn by the driver from events that rank 0
posts to a `ProgressBoard`, a tiny Ray actor the driver creates for each stage:

    {"kind": "step", "stage", "phase", "index", "phases", "step", "steps", "loss", "samples_per_s"}
    {"kind": "epoch", ..., "epoch", "epochs", "loss", "samples_per_s", "eta_s"}
    {"kind": "phase", ..., "accuracy", "sparsity", "nonzero", "params", "wall_s", "warnings"}
    {"kind": "note", "text"}

Posting is fire-and-forget (`.remote()` without waiting), at most every `STEP_INTERVAL_S` for step
events, so a step never waits on the driver. The board only queues events; `drain` hands them
over. Nothing here decides what the console looks like (orchestrator/console.py does).
"""

from __future__ import annotations

import sys
import time

STEP_INTERVAL_S = 0.5


class ProgressBoard:
    """The driver's mailbox for one stage's progress events (a Ray actor, no CPU)."""

    def __init__(self):
        self._events: list[dict] = []

    def post(self, event: dict) -> None:
        self._events.append(event)

    def drain(self) -> list[dict]:
        events, self._events = self._events, []
        return events


class Progress:
    """Rank 0's side: posts events to the board (if there is one) and writes the same news as a
    line to its own output (the worker log). Other ranks only write nothing."""

    def __init__(self, board, rank: int, stage: str):
        self.board = board if rank == 0 else None
        self.rank = rank
        self.stage = stage
        self._last_step_post = 0.0

    def _post(self, event: dict) -> None:
        if self.board is not None:
            self.board.post.remote({"stage": self.stage, **event})

    def _line(self, text: str) -> None:
        # sys.stdout, not print(): Ray Train patches print() in workers and, because Ray wraps
        # stdout, every printed line would reach the log twice.
        if self.rank == 0:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def step(self, phase, step: int, steps: int, loss: float, samples_per_s: float) -> None:
        now = time.monotonic()
        if now - self._last_step_post < STEP_INTERVAL_S and step < steps:
            return
        self._last_step_post = now
        self._post({"kind": "step", "phase": phase.name, "index": phase.index, "step": step,
                    "steps": steps, "loss": loss, "samples_per_s": samples_per_s})

    def epoch(self, phase, phases: int, epoch: int, loss: float, samples_per_s: float,
              eta_s: float) -> None:
        self._post({"kind": "epoch", "phase": phase.name, "index": phase.index, "phases": phases,
                    "epoch": epoch, "epochs": phase.epochs, "loss": loss,
                    "samples_per_s": samples_per_s, "eta_s": eta_s})
        self._line(epoch_line(self.stage, phase.name, phase.index, phases, epoch, phase.epochs,
                              loss, samples_per_s))

    def phase_done(self, phase, accuracy: float, sparsity: float, nonzero: int, params: int,
                   wall_s: float, warnings: list[str]) -> None:
        self._post({"kind": "phase", "phase": phase.name, "index": phase.index,
                    "accuracy": accuracy, "sparsity": sparsity, "nonzero": nonzero,
                    "params": params, "wall_s": wall_s, "warnings": warnings})
        self._line(phase_line(self.stage, phase.name, accuracy, sparsity, nonzero, params, wall_s))

    def note(self, text: str) -> None:
        self._post({"kind": "note", "text": text})
        self._line(text)


def epoch_line(stage: str, name: str, index: int, phases: int, epoch: int, epochs: int,
               loss: float, samples_per_s: float) -> str:
    return (f"[{stage}] {name} ({index + 1}/{phases}) epoch {epoch + 1}/{epochs}: loss "
            f"{loss:.4f}, {samples_per_s:,.0f} samples/s")


def phase_line(stage: str, name: str, accuracy: float, sparsity: float, nonzero: int,
               params: int, wall_s: float) -> str:
    return (f"[{stage}] {name} done: accuracy {accuracy:.4f}, sparsity {sparsity:.4f}, "
            f"{nonzero:,}/{params:,} nonzero, {wall_s:.1f}s")
