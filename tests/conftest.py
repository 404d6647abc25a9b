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


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """A real Ray head with token authentication on 127.0.0.1, shared by the cluster tests."""
    from ray_head import TOKEN, ray_head

    log = tmp_path_factory.mktemp("head") / "head.log"
    with ray_head(TOKEN, num_cpus=2, log_path=log) as address:
        yield address
