#!/usr/bin/env bash
# Create .venv with stillhouse and its pinned engines. Safe to run again: it does nothing when
# pyproject.toml has not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
STAMP=.venv/.stillhouse-setup
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
    exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
# The CPU build of torch first: an unpinned torch (or a package asking for a newer one) would
# pull a multi-GB CUDA build.
.venv/bin/pip install --quiet torch==2.13.0
.venv/bin/pip install --quiet -e '.[test]'
# DeepSpeed's CPU accelerator JIT-compiles its shared-memory allreduce op on first use (~45 s on
# 2 cores); build it once here instead of inside the first job's workers.
DS_ACCELERATOR=cpu .venv/bin/python - <<'PY'
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None:
    builder.load(verbose=False)
PY
echo "$want" > "$STAMP"
