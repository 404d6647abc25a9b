"""The Ray cluster a job runs on: an embedded local one (the default of `stillhouse run`) or an
existing one (`--address`, as in a submitted job), and the CPU and GPU checks that turn an
unsatisfiable placement (which Ray would wait on forever) into a clear error.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cluster.ray_output import before_ray_init, route_ray_output
from specs.errors import InputError, JobStopped
from specs.job import JobSpec


class ClusterResourceError(InputError):
    """The cluster cannot give the job the CPUs or GPUs its spec asks for."""


def cpu_demand(spec: JobSpec) -> str:
    r = spec.resources
    together = "+" if spec.replicas_beside_workers else "or, never at once,"
    training = ""
    if spec.trains_teacher and r.teacher_training_cpus is not None:
        training = (f"; before them, {r.student_workers} workers x "
                    f"{r.teacher_training_cpus:g} training the teacher")
    return (
        f"{spec.total_cpus:g} CPUs ({r.teacher_replicas} teacher replicas x {r.teacher_cpus:g} "
        f"{together} {r.student_workers} student workers x {r.student_cpus:g}{training})"
    )


def check_cpus(spec: JobSpec, cpus: float, where: str) -> None:
    if spec.total_cpus > cpus + 1e-9:
        raise ClusterResourceError(
            f"the job asks for {cpu_demand(spec)} but {where} has {cpus:g}; lower "
            "`resources.teacher_replicas`, `resources.student_workers` or their CPUs"
        )


def gpu_demand(spec: JobSpec) -> int:
    """Whole GPUs the job holds at once: those the workers' and the replicas' GPU shares fill
    together (none spans two GPUs; a shared worker and replicas may fill one); replicas that
    leave before the workers start (cached logits) need theirs only until then."""
    r = spec.resources
    if spec.replicas_beside_workers:
        return r.gpus_filled(r.teacher_gpu_shares + r.student_gpu_shares)
    return max(r.teacher_total_gpus, r.student_total_gpus)


def check_gpus(spec: JobSpec, gpus: float, where: str) -> None:
    demand = gpu_demand(spec)
    if demand > gpus + 1e-9:
        r = spec.resources
        together = "+" if spec.replicas_beside_workers else "or, never at once,"
        raise ClusterResourceError(
            f"the job asks for {demand} GPUs ({r.teacher_replicas} teacher replicas x "
            f"{r.teacher_gpus:g} GPU {together} {r.student_workers} student workers x "
            f"{r.student_gpus:g}) but {where} has {gpus:g}; lower `resources.student_gpus`, "
            "`resources.teacher_gpus` or the counts"
        )


def machine_gpus(spec: JobSpec) -> int:
    """CUDA devices this process sees; only counted (torch loaded) when the spec asks for GPUs."""
    if gpu_demand(spec) == 0:
        return 0
    from trainers.device import cuda_device_count

    return cuda_device_count()


def check_machine(spec: JobSpec, cpus: int | None = None) -> None:
    """Before Ray starts: this machine has the CPUs and GPUs the job asks for."""
    check_cpus(spec, cpus or os.cpu_count() or 1, "this machine")
    check_gpus(spec, machine_gpus(spec), "this machine")


def check_cluster(spec: JobSpec, resources: dict, where: str) -> None:
    """A running cluster (`ray.cluster_resources()` or `ray.available_resources()`) has them."""
    check_cpus(spec, resources.get("CPU", 0.0), where)
    check_gpus(spec, resources.get("GPU", 0.0), where)


STOPPED_MESSAGE = ("stillhouse: stopped (SIGTERM); nothing more was committed. Rerun the same "
                   "command to resume")


def stop_on_sigterm() -> None:
    """After `ray.init` (which installs its own handler, a bare `sys.exit`): SIGTERM raises
    `JobStopped` in the main thread, so the driver unwinds at once with a clear message, before
    the few seconds of grace Ray Jobs gives before SIGKILL could let it write anything more."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it outright
        # said first: Ray Jobs sends SIGKILL 3 s after its SIGTERM, which may come before the
        # driver has let go of its actors and the cluster
        print(STOPPED_MESSAGE, file=sys.stderr, flush=True)
        raise JobStopped("SIGTERM")

    signal.signal(signal.SIGTERM, stop)


# Ray Train settings for an embedded (one-machine) cluster; a variable already set wins. Its
# processes inherit them from this one when `ray.init` starts the cluster. A submitted job gets
# the first one only (cluster/jobs.py): a real cluster's nodes can be drained.
EMBEDDED_RAY_TRAIN_ENV = {
    # the controller polls its worker group every 2 s by default, so a stage's end (or a failed
    # worker) waited up to 2 s to be noticed, twice per job
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # one machine is never drained: no watcher actor (a Python process) per worker group
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
}


@contextmanager
def embedded_cluster(spec: JobSpec, num_cpus: int | None = None,
                     py_modules: list[str] | None = None, log_dir: Path | None = None,
                     verbose: bool = False) -> Iterator[None]:
    """Start a local Ray cluster for one job and stop it afterwards.

    The dashboard (needed by Ray Train's state queries) listens on 127.0.0.1 only. A watcher
    (cluster/reaper.py) stops the processes a killed driver's cluster would leave behind.
    `py_modules`: folders of trusted packages every worker must import (a `python` model's
    factory), shipped through Ray's runtime environment. `log_dir`: where Ray's and the workers'
    output goes instead of the console (cluster/ray_output.py; the console too with `verbose`).
    """
    cpus = num_cpus or os.cpu_count() or 1
    check_machine(spec, cpus)  # before anything starts
    import ray

    for name, value in EMBEDDED_RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)

    from cluster.reaper import Reaper

    reaper = Reaper()
    try:
        if log_dir is not None:
            before_ray_init(log_dir, verbose)
        ray.init(
            address="local",  # always a new cluster, even when RAY_ADDRESS names another one
            num_cpus=cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            logging_level="warning",
            runtime_env={"py_modules": list(py_modules)} if py_modules else None,
        )
        if log_dir is not None:
            route_ray_output(log_dir, verbose)
        stop_on_sigterm()
        try:
            # Ray counts the GPUs it sees itself (CUDA_VISIBLE_DEVICES, NVML)
            check_cluster(spec, ray.available_resources(), "the local Ray cluster")
            check_placement(spec, ray.nodes())
            yield
        finally:
            ray.shutdown()
    finally:
        reaper.done()


def check_placement(spec: JobSpec, nodes: list[dict]) -> None:
    """Each role's labelled nodes must have the CPUs and GPUs that role asks for (Ray would wait
    forever).

    `nodes` is `ray.nodes()`: dicts with `Alive`, `Labels` and `Resources`.
    """
    r = spec.resources
    for role, labels, demand, gpu_demand_ in (
        ("teacher replicas", r.teacher_labels, r.teacher_replicas * r.teacher_cpus,
         r.teacher_total_gpus),
        ("student workers", r.student_labels, r.student_workers * spec.most_worker_cpus,
         r.student_total_gpus),
    ):
        if not labels:
            continue
        matching = [n for n in nodes if n.get("Alive")
                    and all(n.get("Labels", {}).get(k) == v for k, v in labels.items())]
        cpus = sum(n.get("Resources", {}).get("CPU", 0.0) for n in matching)
        if cpus + 1e-9 < demand:
            raise ClusterResourceError(
                f"the {role} need {demand:g} CPUs on nodes labelled {labels}, but "
                f"{len(matching)} such node(s) have {cpus:g}"
            )
        gpus = sum(n.get("Resources", {}).get("GPU", 0.0) for n in matching)
        if gpus + 1e-9 < gpu_demand_:
            raise ClusterResourceError(
                f"the {role} need {gpu_demand_} GPUs on nodes labelled {labels}, but "
                f"{len(matching)} such node(s) have {gpus:g}"
            )


@contextmanager
def existing_cluster(spec: JobSpec, address: str, log_dir: Path | None = None,
                     verbose: bool = False) -> Iterator[None]:
    """Connect to a running cluster (`auto` inside a submitted job) and disconnect afterwards."""
    import ray

    if log_dir is not None:
        before_ray_init(log_dir, verbose)
    ray.init(address=address, logging_level="warning", log_to_driver=True)
    if log_dir is not None:
        route_ray_output(log_dir, verbose)
    stop_on_sigterm()
    try:
        check_cluster(spec, ray.cluster_resources(), f"the cluster at {address}")
        check_placement(spec, ray.nodes())
        yield
    finally:
        ray.shutdown()


CURRENT = "current"  # as a job's address: the cluster this process has already connected to


@contextmanager
def current_cluster(spec: JobSpec) -> Iterator[None]:
    """The cluster this process is connected to (a sweep's one embedded cluster for all its
    points), checked for the job's CPUs and left running afterwards."""
    import ray

    if not ray.is_initialized():
        raise RuntimeError("address 'current' needs a Ray cluster this process has started")
    check_cluster(spec, ray.cluster_resources(), "the current Ray cluster")
    check_placement(spec, ray.nodes())
    yield


def job_cluster(spec: JobSpec, address: str | None, py_modules: list[str] | None = None,
                log_dir: Path | None = None, verbose: bool = False):
    """The cluster for one job: the current one (`CURRENT`), an existing one at `address`, or a
    new embedded one. (On an existing cluster, trusted packages come with the submitted job's
    runtime environment: cluster/jobs.py.)"""
    if address == CURRENT:
        return current_cluster(spec)
    if address:
        return existing_cluster(spec, address, log_dir=log_dir, verbose=verbose)
    return embedded_cluster(spec, py_modules=py_modules, log_dir=log_dir, verbose=verbose)
