#!/usr/bin/env bash
# Create .venv with stillhouse and its pinned engines. Safe to run again: it does nothing when
# pyproject.toml and this script have not changed since the last successful run.
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
# torch first, and exactly this build: `===` (no local version label) takes the registry's CUDA
# 13.0 build of 2.13.0, which runs on a GPU and on the CPU; torchvision 0.28.0 and timm import only
# with it. An unpinned torch (or a package asking for a newer one) would pull another release.
.venv/bin/pip install --quiet 'torch===2.13.0' 'torchvision==0.28.0'
.venv/bin/pip install --quiet -e '.[test]'
echo "$want" > "$STAMP"
