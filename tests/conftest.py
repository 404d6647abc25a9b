import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).parent))  # tests/ray_head.py

# no test may reach W&B's servers: runs without a key log offline, by the spec's `auto` mode
os.environ.pop("WANDB_API_KEY", None)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` are skipped, with the reason, where torch sees no CUDA device."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU: torch {torch.__version__} (built for CUDA "
                                   f"{torch.version.cuda}) sees none on this machine")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"MNIST not found under {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def gloo_process_group():
    """One gloo group of one process for every in-process engine test of the session: DeepSpeed
    keeps the groups it builds from the first default group (its data-parallel and mesh groups),
    so a group destroyed and made anew by a later module leaves it holding unregistered ones."""
    import socket

    import torch.distributed as dist

    from trainers.engine import set_distributed_env

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    set_distributed_env(0, 0, 1, 1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="session")
def head(tmp_path_factory):
    """A real Ray head with token authentication on 127.0.0.1, shared by the cluster tests."""
    from ray_head import TOKEN, ray_head

    log = tmp_path_factory.mktemp("head") / "head.log"
    with ray_head(TOKEN, num_cpus=2, log_path=log) as address:
        yield address


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> dict:
    """A teacher spec section loading an MLP trained here in plain torch (about a second), for
    the tests about what surrounds training, so that their jobs skip the teacher stage."""
    import torch
    from safetensors.torch import save_file
    from torch.nn import functional as F

    from specs.job import DigitsData
    from trainers.data import load_digits
    from trainers.models import MLP

    data = load_digits(DigitsData(kind="digits"), seed=0)
    torch.manual_seed(0)
    model = MLP(64, [128, 128], 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    for _ in range(60):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    path = tmp_path_factory.mktemp("teacher") / "digits-teacher.safetensors"
    save_file(model.state_dict(), str(path))
    return {"kind": "checkpoint", "model": {"kind": "mlp", "hidden": [128, 128]}, "path": str(path)}
