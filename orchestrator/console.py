"""What a job shows on the console: one line per stage, and a progress bar per phase.

The workers post progress events (trainers/progress.py) to a board the driver follows while a
stage trains. On a terminal each phase gets a tqdm bar (steps, loss, samples/s, time left),
replaced by the phase's result line when it ends; elsewhere (a file, CI, a submitted job's logs)
each epoch and each phase is one plain line. Ray's and the workers' own output goes to the run
dir's `logs/` (cluster/ray_output.py); `--verbose` shows it here as well.
"""

from __future__ import annotations

import sys
import threading
from contextlib import contextmanager

from trainers.progress import epoch_line, phase_line

POLL_S = 0.25


def say(message: str) -> None:
    print(f"[stillhouse] {message}", flush=True)


class _Renderer:
    """Turns events into console output; one bar at a time (a stage's phases run in order)."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.bar = None
        self.bar_phase = None

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.bar_phase = None

    def _write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def handle(self, event: dict) -> None:
        kind = event["kind"]
        if kind == "step" and self.interactive:
            if self.bar_phase != event["phase"]:
                from tqdm import tqdm

                self._close_bar()
                self.bar = tqdm(total=event["steps"], desc=f"[{event['stage']}] {event['phase']}",
                                unit="step", file=sys.stderr, dynamic_ncols=True, leave=False)
                self.bar_phase = event["phase"]
            self.bar.n = event["step"]
            self.bar.set_postfix(loss=f"{event['loss']:.4f}",
                                 samples_s=f"{event['samples_per_s']:,.0f}", refresh=False)
            self.bar.refresh()
        elif kind == "epoch" and not self.interactive:
            line = epoch_line(event["stage"], event["phase"], event["index"], event["phases"],
                              event["epoch"], event["epochs"], event["loss"],
                              event["samples_per_s"])
            if event["epoch"] + 1 < event["epochs"]:
                line += f", about {_duration(event['eta_s'])} left in the phase"
            self._write(line)
        elif kind == "phase":
            if self.bar_phase == event["phase"]:
                self._close_bar()
            self._write(phase_line(event["stage"], event["phase"], event["accuracy"],
                                   event["sparsity"], event["nonzero"], event["params"],
                                   event["wall_s"]))
            for warning in event.get("warnings", []):
                self._write(f"[stillhouse] warning: {warning}")
        elif kind == "note":
            self._write(event["text"])

    def close(self) -> None:
        self._close_bar()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@contextmanager
def follow(board, interactive: bool | None = None):
    """Show `board`'s events while the block runs (a stage's `trainer.fit()`), and the last
    ones after it. `board` is a ProgressBoard actor handle; None shows nothing."""
    if board is None:
        yield
        return
    import ray

    renderer = _Renderer(sys.stderr.isatty() if interactive is None else interactive)
    stop = threading.Event()

    def drain() -> None:
        for event in ray.get(board.drain.remote()):
            renderer.handle(event)

    def poll() -> None:
        while not stop.wait(POLL_S):
            try:
                drain()
            except Exception:  # the board or the cluster is going away: the stage's end says why
                return

    thread = threading.Thread(target=poll, name="stillhouse-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            drain()  # what arrived after the last poll
        except Exception:
            pass
        renderer.close()
