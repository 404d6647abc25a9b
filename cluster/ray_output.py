"""Where Ray's own output goes: into the run dir's `logs/`, not onto the user's console.

A job's console shows stillhouse's lines and progress (orchestrator/console.py). Everything Ray
prints is kept, in files, because it is what one reads when something goes wrong:

* `logs/workers.log`: the output of every worker process of the job (Ray Train's controller and
  workers, teacher replicas, Ray Data tasks), as Ray forwards it to the driver, one line per
  line, prefixed with the actor or task and its pid;
* `logs/driver.log`: the driver's Python logging from Ray, Ray Data and Ray Train (INFO and
  up), and Python warnings raised in the driver.

With `verbose` the console also shows all of it, as Ray would. Errors stay loud: ERROR records
from Ray's loggers still reach the console, and a failed job's message names the log file.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve")
_HANDLER = "stillhouse_workers_log"
# notices `ray.init` logs as warnings although nothing is wrong: kept in the log, off the console
STARTUP_NOTICES = ("ray._private.authentication.authentication_token_setup",)


def before_ray_init(log_dir: Path, verbose: bool = False) -> None:
    """What must be in place before `ray.init`: its start-up notices (token authentication is
    on, as stillhouse wants it) go to `logs/driver.log` instead of the console."""
    if verbose:
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    handler = _driver_log(log_dir)
    for name in STARTUP_NOTICES:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False


def _driver_log(log_dir: Path) -> logging.Handler:
    """One file handler per log file, shared by every logger that writes there."""
    path = str((log_dir / "driver.log").resolve())
    handler = _DRIVER_LOGS.get(path)
    if handler is None:
        handler = logging.FileHandler(path)
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.set_name("stillhouse_driver_log")
        _DRIVER_LOGS[path] = handler
    return handler


_DRIVER_LOGS: dict[str, logging.Handler] = {}


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (Ray's PlainRayHandler picks its stream per record)."""
    if isinstance(handler, logging.FileHandler):
        return False
    if type(handler).__name__ == "PlainRayHandler":
        return True
    return getattr(handler, "stream", None) in (sys.stdout, sys.stderr, sys.__stdout__,
                                                sys.__stderr__)


def route_ray_output(log_dir: Path, verbose: bool = False) -> Path:
    """Send the connected Ray cluster's output for this job to `log_dir` (created); returns it.

    Call it after `ray.init`, which sets up Ray's console handlers; calling it again (a sweep's
    next point) adds nothing twice."""
    log_dir.mkdir(parents=True, exist_ok=True)
    _route_worker_lines(log_dir / "workers.log", verbose)
    driver_log = _driver_log(log_dir)
    import ray.data  # configures its own console handler when first imported

    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if h.get_name() != "stillhouse_driver_log"]
        logger.addHandler(driver_log)
        if not verbose:
            for handler in logger.handlers:
                if _is_console(handler):
                    handler.setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose  # Ray Data's own bars: the console's are ours
    context.print_on_execution_start = verbose
    # Python warnings in the driver (torch's FutureWarnings, Ray's notices): to the file
    logging.captureWarnings(True)
    py_warnings = logging.getLogger("py.warnings")
    py_warnings.handlers = [driver_log]
    py_warnings.propagate = verbose
    return log_dir


def _route_worker_lines(path: Path, verbose: bool) -> None:
    """Ray forwards worker output to the driver through a dispatcher of handlers; stillhouse's
    handler writes it to `path`, and Ray's own (which prints to the console) is removed unless
    `verbose`."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    handle = open(path, "a", buffering=1)

    def write(batch: dict) -> None:
        who = batch.get("actor_name") or batch.get("task_name") or ""
        prefix = f"({who} pid={batch.get('pid')}) " if who else f"(pid={batch.get('pid')}) "
        stream = "stderr " if batch.get("is_err") else ""
        for line in batch.get("lines", []):
            handle.write(f"{prefix}{stream}{line}\n")

    dispatcher.remove_handler(_HANDLER)
    dispatcher.add_handler(_HANDLER, write)
    if not verbose:
        dispatcher.remove_handler("ray_print_logs")
