"""The teacher server and the three ways a teacher arrives, without Ray."""

import io

import numpy as np
import pytest
import torch
from safetensors.torch import save

from specs.job import CheckpointTeacher, ExportedTeacher, MLPModel
from trainers.models import MLP
from trainers.teacher_server import TeacherLoadError, TeacherServer, load_teacher

SHAPE = (1, 8, 8)


def _model():
    torch.manual_seed(0)
    return MLP(64, [32], 10).eval()


def test_checkpoint_teacher_roundtrip():
    model = _model()
    blob = save(model.state_dict())
    spec = CheckpointTeacher(kind="checkpoint", model=MLPModel(kind="mlp", hidden=[32]), path="t")
    loaded = load_teacher(spec, blob, SHAPE, 10)
    x = torch.randn(5, *SHAPE)
    assert torch.equal(loaded(x), model(x))


def test_checkpoint_of_another_model_is_rejected():
    blob = save(_model().state_dict())
    spec = CheckpointTeacher(kind="checkpoint", model=MLPModel(kind="mlp", hidden=[64]), path="t")
    with pytest.raises(TeacherLoadError, match="do not fit"):
        load_teacher(spec, blob, SHAPE, 10)
    with pytest.raises(TeacherLoadError, match="safetensors"):
        load_teacher(spec, b"not a file", SHAPE, 10)


def export_with_dynamic_batch(model, fmt: str) -> bytes:
    """The program file a user makes as torch's docs show: `torch.export.export` with a dynamic
    batch dimension and `torch.export.save`, or a traced TorchScript module."""
    example = torch.randn(4, *SHAPE)
    buffer = io.BytesIO()
    if fmt == "torch_export":
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}}),
                          buffer)
    else:
        torch.jit.save(torch.jit.trace(model, example), buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["torch_export", "torchscript"])
def test_exported_teachers_load_and_serve_every_batch_size(fmt):
    """The served program answers batches of every size a job sends (1 included), as the model
    it was exported from does; `TeacherServer` runs a torch.export module without `.eval()`,
    which torch refuses on it."""
    model = _model()
    spec = ExportedTeacher(kind="exported", path="t", format=fmt)
    loaded = load_teacher(spec, export_with_dynamic_batch(model, fmt), SHAPE, 10)
    server = TeacherServer(loaded, "fp32")
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 7, 64, 513):
        x = rng.standard_normal((n, *SHAPE)).astype(np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        # the same ops on the same inputs; a traced graph may fuse differently: 1e-5 of the
        # logits' scale (about 1)
        np.testing.assert_allclose(server.logits(x), expected, atol=1e-5, rtol=0)
    with pytest.raises(TeacherLoadError):
        load_teacher(spec, b"garbage", SHAPE, 10)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_server_answers_float32_logits(precision):
    model = _model()
    server = TeacherServer(model, precision)
    x = np.random.default_rng(0).standard_normal((6, *SHAPE)).astype(np.float32)
    out = server.logits(x)
    assert out.shape == (6, 10) and out.dtype == np.float32
    ref = model(torch.from_numpy(x)).detach().numpy()
    assert np.allclose(out, ref, atol=0.1 if precision == "bf16" else 1e-6)
    assert not any(p.requires_grad for p in model.parameters())


def test_request_batcher_coalesces_concurrent_requests():
    import asyncio

    from trainers.teacher_server import RequestBatcher

    seen = []

    def double(x):
        seen.append(len(x))
        return x * 2

    async def main():
        batcher = RequestBatcher(double, max_rows=1000, max_wait_s=0.05)
        inputs = [np.full((i + 1, 3), i, np.float32) for i in range(10)]
        outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        for x, y in zip(inputs, outputs):
            assert np.array_equal(y, x * 2)  # each caller gets its own rows back
        return batcher

    batcher = asyncio.run(main())
    assert seen == [55] and batcher.calls == 1 and batcher.requests == 10


def test_request_batcher_sends_a_full_batch_at_once_and_propagates_errors():
    import asyncio

    from trainers.teacher_server import RequestBatcher

    async def full():
        batcher = RequestBatcher(lambda x: x, max_rows=4, max_wait_s=10.0)  # no waiting 10 s
        return await asyncio.wait_for(batcher.submit(np.zeros((4, 2))), timeout=2)

    assert asyncio.run(full()).shape == (4, 2)

    def broken(x):
        raise ValueError("teacher exploded")

    async def failing():
        batcher = RequestBatcher(broken, max_rows=100, max_wait_s=0.01)
        await asyncio.gather(batcher.submit(np.zeros((1, 2))), batcher.submit(np.zeros((1, 2))))

    with pytest.raises(ValueError, match="exploded"):
        asyncio.run(failing())
