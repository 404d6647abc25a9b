# The two commands of the README. Each sets up .venv first (scripts/setup.sh is idempotent).
.PHONY: setup demo test lint fast-tests ray-tests

setup:
	@bash scripts/setup.sh

# The digits job on an embedded local Ray cluster, offline. Rerunning resumes (and, once the job
# is complete, only reprints its report); remove runs/digits to start over.
demo: setup
	.venv/bin/stillhouse run examples/digits.yaml --run-dir runs/digits

# Lint and the fast tests first (no Ray; a few minutes), stopping at the first failure; then the
# tests on real Ray clusters.
test: setup lint fast-tests ray-tests

lint:
	.venv/bin/ruff check --select F,E9 specs trainers cluster orchestrator tests bench scripts

fast-tests:
	.venv/bin/python -m pytest -q -x -m "not ray" --durations=5

ray-tests:
	.venv/bin/python -m pytest -q -m ray --durations=15
