# The two commands of the README. Each sets up .venv first (scripts/setup.sh is idempotent).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

# The digits job on an embedded local Ray cluster, offline. Rerunning resumes (and, once the job
# is complete, only reprints its report); remove runs/digits to start over.
demo: setup
	.venv/bin/stillhouse run examples/digits.yaml --run-dir runs/digits

test: setup
	.venv/bin/python -m pytest -q --durations=15
