import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))  # tests/wandb_records.py

# no test may reach W&B's servers: runs without a key log offline, by the spec's `auto` mode
os.environ.pop("WANDB_API_KEY", None)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {SHARED_DATA}")
    return SHARED_DATA
