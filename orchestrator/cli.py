"""The `stillhouse` command line.

    stillhouse validate examples/digits.yaml          # every problem at once, exit 2 if any
    stillhouse schema                                  # the job spec's JSON Schema
    stillhouse run examples/digits.yaml --run-dir runs/digits [--data-dir ../shared/data]

Exit status: 0 success, 1 the job failed while running, 2 bad input (spec, data, teacher file,
checkpoint, run dir, CPUs the cluster cannot give).
"""

from __future__ import annotations

import argparse
import json
import sys

from specs import SpecError, load_spec

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for path in args.specs:
        try:
            spec = load_spec(path)
        except SpecError as err:
            print(err, file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"{path}: ok ({spec.name})")
    return status


def _schema(args: argparse.Namespace) -> int:
    from specs.job import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    try:
        spec = load_spec(args.spec)
    except SpecError as err:
        print(err, file=sys.stderr)
        return EXIT_BAD_INPUT
    from cluster.local import ClusterResourceError
    from orchestrator.job import JobError, RunDirError, run_job
    from trainers.checkpoint import CheckpointError
    from trainers.data import DataError
    from trainers.teacher_server import TeacherLoadError

    try:
        run_job(spec, data_dir=args.data_dir, run_dir=args.run_dir)
    except (DataError, TeacherLoadError, CheckpointError, RunDirError, ClusterResourceError) as err:
        print(f"stillhouse: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except JobError as err:
        print(f"stillhouse: job failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("stillhouse: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


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
    p = sub.add_parser("run", help="run a job on an embedded local Ray cluster (resumes)")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--data-dir", help="folder holding datasets (e.g. ../shared/data)")
    p.add_argument("--run-dir", help="where checkpoints and the report go (default runs/<name>)")
    p.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
