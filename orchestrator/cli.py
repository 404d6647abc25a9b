"""The `stillhouse` command line.

    stillhouse validate examples/digits.yaml          # every problem at once, exit 2 if any
    stillhouse plan examples/digits.yaml               # the spec against its data and models
    stillhouse schema                                  # the job spec's JSON Schema
    stillhouse run examples/digits.yaml --run-dir runs/digits [--data-dir ../shared/data]
    stillhouse submit examples/digits.yaml --address http://127.0.0.1:8265 --run-dir /shared/runs/d1
    stillhouse status|logs [--follow]|stop JOB_ID --address ...;  stillhouse list --address ...
    stillhouse export runs/digits          # the compact model file of a finished run, again

`--trust-module PACKAGE` (repeatable, or STILLHOUSE_TRUSTED_MODULES=a,b) lets a spec's `python`
model kind import and run code from PACKAGE; a spec alone never runs code.
    stillhouse report runs/digits          # its tables and plots

Exit status: 0 success, 1 the job failed while running, 2 bad input (spec, data, teacher file,
checkpoint, run dir, CPUs the cluster cannot give).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from specs import SpecError, load_spec
from specs.errors import InputError, JobError, JobStopped
from specs.sweep import expand_sweep

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
            points = expand_sweep(spec, str(path))
        except SpecError as err:
            print(err, file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        sweep = f", sweep of {len(points)} points" if spec.sweep else ""
        print(f"{path}: ok ({spec.name}{sweep})")
    return status


def _schema(args: argparse.Namespace) -> int:
    from specs.job import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _load(path: str):
    """(spec, its sweep points), or None after printing every problem (exit 2)."""
    try:
        spec = load_spec(path)
        return spec, expand_sweep(spec, path)
    except SpecError as err:
        print(err, file=sys.stderr)
        return None


def _run(args: argparse.Namespace) -> int:
    loaded = _load(args.spec)
    if loaded is None:
        return EXIT_BAD_INPUT
    spec, points = loaded
    if spec.sweep is not None and args.command == "run":
        print(f"stillhouse: {args.spec} declares a sweep of {len(points)} points: "
              "use `stillhouse sweep`", file=sys.stderr)
        return EXIT_BAD_INPUT
    from orchestrator.job import run_job

    trusted = tuple(args.trust_module)
    try:
        if args.command == "sweep":
            from orchestrator.sweep import run_sweep

            run_sweep(spec, run_dir=args.run_dir or f"runs/{spec.name}-sweep",
                      data_dir=args.data_dir, address=args.address, trusted_modules=trusted,
                      verbose=args.verbose)
        else:
            run_job(spec, data_dir=args.data_dir, run_dir=args.run_dir, address=args.address,
                    trusted_modules=trusted, verbose=args.verbose)
    except InputError as err:
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobError as err:
        print(f"stillhouse: job failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except JobStopped:  # the SIGTERM handler has said so (cluster/local.py)
        return 143
    except KeyboardInterrupt:
        print("stillhouse: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def _export(args: argparse.Namespace) -> int:
    from orchestrator.compress import export_run_dir
    from orchestrator.report import format_table

    from trainers.models import trusted_modules

    try:
        report = export_run_dir(Path(args.run_dir), args.data_dir,
                                trusted_modules(tuple(args.trust_module)))
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    except (InputError, OSError) as err:
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobError as err:
        print(f"stillhouse: export failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(format_table(report))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Check a spec against its data and models, as `run` does before anything starts."""
    loaded = _load(args.spec)
    if loaded is None:
        return EXIT_BAD_INPUT
    _, points = loaded
    from orchestrator.preflight import preflight
    from trainers.models import trusted_modules

    trusted = trusted_modules(tuple(args.trust_module))
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    try:
        for point, point_spec in points:
            plan = preflight(point_spec, data_dir, trusted)
            from trainers.engine_config import ray_train_configs

            for stage in ("teacher", "student"):  # Ray Train's configs, as the job builds them
                ray_train_configs(point_spec, Path("runs") / point_spec.name, stage)
            if point:
                print(f"sweep point {point}:")
            print("\n".join(plan.describe()))
    except InputError as err:
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _report(args: argparse.Namespace) -> int:
    from orchestrator.report import format_table, publish_report

    path = Path(args.run_dir) / "report.json"
    try:
        report = json.loads(path.read_text())
        plots = publish_report(report, Path(args.run_dir))
        table = format_table(report)
    except FileNotFoundError:
        print(f"stillhouse: error: {path} does not exist (is {args.run_dir} a finished run "
              "dir?)", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        print(f"stillhouse: error: {path} is not a stillhouse report: {err!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(table)
    for path in plots.values():
        print(f"plot: {path}")
    return 0


def _cluster_command(fn):
    """Run a Jobs API command; a ClusterError is one line on stderr and exit status 1."""

    def wrapped(args: argparse.Namespace) -> int:
        from cluster.jobs import ClusterError

        try:
            return fn(args)
        except ClusterError as err:
            print(f"stillhouse: {err}", file=sys.stderr)
            return EXIT_FAILED

    return wrapped


@_cluster_command
def _submit(args: argparse.Namespace) -> int:
    loaded = _load(args.spec)
    if loaded is None:  # nothing is sent when the spec is invalid
        return EXIT_BAD_INPUT
    spec, _ = loaded
    from cluster import jobs

    from trainers.models import trusted_modules

    try:
        job_id = jobs.submit(spec, args.address, run_dir=args.run_dir, data_dir=args.data_dir,
                             trusted=trusted_modules(tuple(args.trust_module)))
    except InputError as err:  # e.g. a trusted package that cannot be found here
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(job_id)
    return 0


@_cluster_command
def _status(args: argparse.Namespace) -> int:
    from cluster import jobs

    print(jobs.status(args.address, args.job_id))
    return 0


@_cluster_command
def _logs(args: argparse.Namespace) -> int:
    from cluster import jobs

    if args.follow:
        final = jobs.follow_logs(args.address, args.job_id, sys.stdout)
        print(f"[stillhouse] job {args.job_id} ended: {final}", file=sys.stderr)
        return 0 if final == "SUCCEEDED" else EXIT_FAILED
    sys.stdout.write(jobs.logs(args.address, args.job_id))
    return 0


@_cluster_command
def _stop(args: argparse.Namespace) -> int:
    from cluster import jobs

    stopped = jobs.stop(args.address, args.job_id)
    print("stopping" if stopped else "already ended")
    return 0


@_cluster_command
def _list(args: argparse.Namespace) -> int:
    from cluster import jobs

    for job in jobs.list_jobs(args.address):
        print(f"{job['job_id']}\t{job['status']}\t{job['name']}")
    return 0


DEFAULT_DB = os.path.expanduser("~/.stillhouse/schedules.sqlite")


def _schedule(args: argparse.Namespace) -> int:
    from cluster import scheduler

    try:
        if args.action == "add":
            Path(args.db).parent.mkdir(parents=True, exist_ok=True)
            print(scheduler.add(args.db, args.spec, address=args.address, run_root=args.run_root,
                                cron=args.cron, data_dir=args.data_dir))
        elif args.action == "remove":
            scheduler.remove(args.db, args.schedule_id)
            print(f"removed {args.schedule_id}")
        else:
            for row in scheduler.listing(args.db):
                print(f"{row['id']}\t{row['cron']}\tnext {row['next_run']}\t{row['spec_path']}")
                for f in row["firings"]:
                    print(f"  {f['slot']}\t{f['status']}\t{f['ray_job_id'] or '-'}\t"
                          f"{f['final_status'] or '-'}\t{f['detail'] or ''}")
    except (SpecError, scheduler.ScheduleError) as err:
        print(err if isinstance(err, SpecError) else f"stillhouse: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _scheduler(args: argparse.Namespace) -> int:
    import logging

    from cluster import scheduler

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        scheduler.serve(args.db)
    except scheduler.ScheduleError as err:
        print(f"stillhouse: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _pool(args: argparse.Namespace) -> int:
    import ray

    from trainers.teacher_pool import stop_shared_pool

    ray.init(address=args.ray_address, logging_level="warning")
    try:
        print(f"stopped {stop_shared_pool(args.name)} replicas of shared pool {args.name}")
    finally:
        ray.shutdown()
    return 0


def _manifests(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    from cluster.manifests import write_all

    for path in write_all(spec, args.image, Path(args.out)):
        print(path)
    return 0


def _add_trust(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-module", action="append", default=[], metavar="PACKAGE",
        help="a top-level package whose code `python` models may import and run (repeatable; "
        "also STILLHOUSE_TRUSTED_MODULES=a,b)",
    )


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", default=os.environ.get("RAY_API_SERVER_ADDRESS"),
        required="RAY_API_SERVER_ADDRESS" not in os.environ,
        help="the cluster's dashboard, e.g. http://127.0.0.1:8265 (env RAY_API_SERVER_ADDRESS)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stillhouse", description="Distil and prune models on a Ray cluster."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="check job specs; report every problem")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.set_defaults(func=_validate)
    p = sub.add_parser("schema", help="print the job spec's JSON Schema")
    p.set_defaults(func=_schema)
    p = sub.add_parser("plan", help="check a spec against its data and models (no Ray)")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data-dir", help="folder holding datasets (e.g. ../shared/data)")
    _add_trust(p)
    p.set_defaults(func=_plan)
    for name, text in (("run", "run a job on an embedded local Ray cluster (resumes)"),
                       ("sweep", "run every point of a spec's sweep grid and compare them")):
        p = sub.add_parser(name, help=text)
        p.add_argument("spec", metavar="SPEC")
        p.add_argument("--data-dir", help="folder holding datasets (e.g. ../shared/data)")
        p.add_argument("--run-dir", help="where checkpoints and the report go "
                       "(default runs/<name>, runs/<name>-sweep)")
        p.add_argument("--address", help="run on this existing Ray cluster (`auto` inside a Ray "
                       "job) instead of an embedded local one")
        _add_trust(p)
        p.add_argument("--verbose", action="store_true", help="also show Ray's and the workers' "
                       "own output (always in <run dir>/logs/)")
        p.set_defaults(func=_run)

    p = sub.add_parser("export", help="quantize and write a finished run's compact model file")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data-dir", help="folder holding datasets (default: the one the run used)")
    _add_trust(p)
    p.set_defaults(func=_export)
    p = sub.add_parser("report", help="print a run's tables and write its plots")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.set_defaults(func=_report)

    p = sub.add_parser("submit", help="submit a job to a Ray cluster; prints the job id")
    p.add_argument("spec", metavar="SPEC")
    _add_address(p)
    p.add_argument("--run-dir", required=True, help="run dir on the cluster's storage")
    p.add_argument("--data-dir", help="data dir on the cluster's storage")
    _add_trust(p)
    p.set_defaults(func=_submit)
    for name, func, text in (("status", _status, "a submitted job's status"),
                             ("logs", _logs, "a submitted job's logs"),
                             ("stop", _stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", metavar="JOB_ID")
        _add_address(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream until the job ends")
        p.set_defaults(func=func)
    p = sub.add_parser("list", help="jobs on a Ray cluster")
    _add_address(p)
    p.set_defaults(func=_list)

    p = sub.add_parser("schedule", help="recurring runs: add, list, remove")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("add", help="run SPEC on a cron schedule")
    a.add_argument("spec", metavar="SPEC")
    a.add_argument("--cron", help="crontab, or 6 fields with leading seconds (default: the spec's)")
    _add_address(a)
    a.add_argument("--run-root", required=True, help="run dirs go under ROOT/<schedule>/<slot>")
    a.add_argument("--data-dir")
    a = actions.add_parser("list", help="schedules and their firings")
    a = actions.add_parser("remove", help="delete a schedule")
    a.add_argument("schedule_id", metavar="ID")
    for a in actions.choices.values():
        a.add_argument("--db", default=DEFAULT_DB, help=f"schedule store (default {DEFAULT_DB})")
    p.set_defaults(func=_schedule)
    p = sub.add_parser("pool", help="shared teacher pools: stop")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("stop", help="kill a shared pool's replicas")
    a.add_argument("name", metavar="NAME")
    a.add_argument("--ray-address", default="auto", help="the cluster's GCS address")
    p.set_defaults(func=_pool)
    p = sub.add_parser("manifests", help="cluster launcher, KubeRay and CronJob configs for SPEC")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--image", default="stillhouse:latest", help="container image with stillhouse")
    p.add_argument("--out", default="cluster/configs", help="folder to write them to")
    p.set_defaults(func=_manifests)
    p = sub.add_parser("scheduler", help="long-running: submit each due run to its cluster")
    p.add_argument("--db", default=DEFAULT_DB)
    p.set_defaults(func=_scheduler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
