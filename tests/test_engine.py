"""The DeepSpeed engine wrapper in one process (a gloo group of one), for each precision and
ZeRO stage: masks hold on the module and on DeepSpeed's fp32 master copy, NaN steps are skipped.
"""

import os

import pytest
import torch

from specs import parse_spec
from trainers.engine import DistillEngine, NonFiniteLossError
from trainers.models import MLP


@pytest.fixture(scope="module", autouse=True)
def process_group(gloo_process_group):
    """The session's gloo group of one (tests/conftest.py)."""


@pytest.fixture(autouse=True)
def restore_linear():
    """A ZeRO 3 engine replaces `torch.nn.functional.linear` for the whole process with
    DeepSpeed's memory-efficient autograd function ("This will persist unless manually reset");
    later tests in this process (TorchScript tracing) need torch's own."""
    linear = torch.nn.functional.linear
    yield
    torch.nn.functional.linear = linear


def _engine(precision: str, zero_stage: int, max_nonfinite: int = 10,
            offload: str = "none") -> DistillEngine:
    spec = parse_spec({
        "name": "engine",
        "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [16]}},
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}},
        "precision": precision,
        # ZeRO 3 partitions every parameter here (threshold 0), as it would a large model's
        "deepspeed": {"zero_stage": zero_stage, "max_nonfinite_steps": max_nonfinite,
                      "offload_optimizer": offload, "param_persistence_threshold": 0},
        # fp16 is a GPU precision in specs; the engine below runs it on the CPU it is given
        "resources": {"student_gpus": 1 if precision == "fp16" else 0},
    })
    torch.manual_seed(0)
    return DistillEngine(MLP(64, [32, 16], 10), spec, lr=0.05, micro_batch=16, weight_decay=0.01,
                         grad_clip=1.0, world_size=1, device=torch.device("cpu"))


def _batch():
    return torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,)), torch.randn(16, 10)


@pytest.mark.parametrize("precision,zero_stage,offload", [
    ("fp32", 0, "none"), ("bf16", 0, "none"), ("bf16", 1, "none"), ("bf16", 2, "none"),
    ("fp32", 2, "none"), ("bf16_autocast", 0, "none"), ("bf16_autocast", 1, "none"),
    ("fp32", 3, "none"), ("bf16", 3, "none"), ("bf16_autocast", 3, "none"),
    ("bf16", 1, "cpu"), ("fp32", 2, "cpu"), ("bf16", 3, "cpu"), ("fp16", 1, "none"),
    ("fp16", 3, "none"),
])
def test_masks_hold_through_optimizer_steps(precision, zero_stage, offload):
    engine = _engine(precision, zero_stage, offload=offload)
    for _ in range(3):  # some dense steps first, so Adam has momentum in every weight
        assert engine.train_step(*_batch(), 2.0, 0.5) is not None
    engine.prune_to(0.6)
    before = {n: p.detach().clone() for n, p in engine.prunable.items()}
    before_fp32 = engine.full_fp32_weights()
    for _ in range(5):
        assert engine.train_step(*_batch(), 2.0, 0.5) is not None
    assert engine.masked_nonzero() == (0, 0)
    weights = engine.full_fp32_weights()
    for name, mask in engine.masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0  # fp32 master copy
        assert not torch.equal(weights[name][mask], before_fp32[name][mask])  # it trained
        if zero_stage < 3:  # under ZeRO 3 the module holds slices, checked by masked_nonzero
            assert not torch.equal(engine.prunable[name].detach()[mask], before[name][mask])
    pruned = sum(int((~m).sum()) for m in engine.masks.values())
    assert pruned == round(0.6 * sum(m.numel() for m in engine.masks.values()))


def test_deepspeed_uses_gloo_without_compiling_its_shared_memory_op():
    from deepspeed.comm import comm

    _engine("fp32", 0)
    assert comm.cdb is not None and comm.cdb.shm_comm_op is None  # the backend DeepSpeed uses


def test_bf16_autocast_keeps_fp32_weights_and_runs_the_forward_in_bf16():
    engine = _engine("bf16_autocast", 0)
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    seen = []
    engine.module.net[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    assert engine.train_step(*_batch(), 2.0, 0.5) is not None
    assert seen == [torch.bfloat16]  # DeepSpeed's torch_autocast wraps the engine's forward


@pytest.mark.parametrize("precision", ["fp32", "bf16", "bf16_autocast"])
def test_one_rank_zero_0_skips_the_gradient_all_reduce_and_trains_the_same(precision):
    """A single worker skips DeepSpeed's bucketed all-reduce (the identity over one rank): the
    weights after some steps equal those of an engine that runs it."""
    fast, full = _engine(precision, 0), _engine(precision, 0)
    assert not fast.engine.enable_backward_allreduce
    full.engine.enable_backward_allreduce = True  # DeepSpeed's default
    torch.manual_seed(3)
    for _ in range(4):
        batch = _batch()
        fast.train_step(*batch, 2.0, 0.5)
        full.train_step(*batch, 2.0, 0.5)
    ref = full.full_fp32_weights()
    for name, weight in fast.full_fp32_weights().items():
        assert torch.equal(weight, ref[name]), name
    assert not torch.equal(ref["net.0.weight"], _engine(precision, 0).full_fp32_weights()["net.0.weight"])


def test_nonfinite_losses_are_skipped_then_fail():
    engine = _engine("bf16", 1, max_nonfinite=2)
    x, y, t = _batch()
    bad = torch.full_like(t, float("nan"))
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    assert engine.train_step(x, y, bad, 2.0, 0.5) is None
    assert engine.train_step(x, y, bad, 2.0, 0.5) is None
    for name, p in engine.module.named_parameters():  # skipped steps change nothing
        assert torch.equal(p.detach(), weights[name])
    assert engine.train_step(x, y, t, 2.0, 0.5) is not None
    with pytest.raises(NonFiniteLossError, match="max_nonfinite_steps"):
        engine.train_step(x, y, bad, 2.0, 0.5)
    assert all(torch.isfinite(p).all() for p in engine.full_fp32_weights().values())


def _spec(precision: str, zero_stage: int, **extra):
    return parse_spec({
        "name": "engine", "data": {"kind": "digits"},
        "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [48, 40]}},
        "student": {"model": {"kind": "mlp", "hidden": [32, 16]}},
        "precision": precision,
        "deepspeed": {"zero_stage": zero_stage, "param_persistence_threshold": 0}, **extra,
    })


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_feature_kd_trains_the_projection_and_leaves_it_unpruned(zero_stage):
    from trainers.features import KD_PREFIX, build_projections, check_feature_spec

    spec = _spec("bf16", zero_stage, distillation={"kind": "hinton", "features": [
        {"student": "net.2", "teacher": "net.2", "weight": 2.0}]})
    s_shapes, t_shapes = check_feature_spec(spec, (1, 8, 8), 10)
    assert (s_shapes, t_shapes) == ([(16,)], [(40,)])
    torch.manual_seed(0)
    model = MLP(64, [32, 16], 10)
    model.add_module(KD_PREFIX, build_projections(s_shapes, t_shapes))
    engine = DistillEngine(model, spec, lr=0.02, micro_batch=16, weight_decay=0.0, grad_clip=1.0,
                           world_size=1, teacher_feature_shapes=t_shapes)
    assert not any(n.startswith(KD_PREFIX) for n in engine.prunable)
    torch.manual_seed(1)
    x, y, t = _batch()
    target = torch.randn(16, 40)  # fixed teacher features for this batch
    proj = "kd_proj.0.weight"
    proj_before = engine.full_fp32_weights([proj])[proj]
    first = engine.train_step(x, y, t, 2.0, 0.5, [target])
    for _ in range(30):
        last = engine.train_step(x, y, t, 2.0, 0.5, [target])
    assert last["feature"] < 0.8 * first["feature"]  # the feature term is optimised
    assert last["loss"] > last["feature"] > 0  # and added to the logit KD loss
    assert not torch.equal(engine.full_fp32_weights([proj])[proj], proj_before)
    engine.prune_to(0.5)
    assert engine.full_fp32_weights([proj])[proj].count_nonzero() == 40 * 16  # unpruned


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_binary_fake_quant_training_keeps_masks_and_learns(zero_stage):
    from trainers.quantize import enable_fake_quant, layer_kinds

    spec = _spec("bf16", zero_stage)
    torch.manual_seed(0)
    engine = DistillEngine(MLP(64, [32, 16], 10), spec, lr=0.02, micro_batch=16,
                           weight_decay=0.0, grad_clip=1.0, world_size=1)
    engine.prune_to(0.5)
    enable_fake_quant(engine.module, layer_kinds(engine.module, "binary"), engine.masks)
    torch.manual_seed(2)
    x, y, t = _batch()
    first = engine.train_step(x, y, t, 2.0, 0.5)
    for _ in range(30):
        last = engine.train_step(x, y, t, 2.0, 0.5)
    assert last["loss"] < 0.7 * first["loss"]
    assert engine.masked_nonzero() == (0, 0)
    # the middle layer computes with +-scale per row on its kept weights, zero elsewhere
    from trainers.codec import fake_quantize

    w = engine.full_fp32_weights(["net.2.weight"])["net.2.weight"].to(engine.dtype)
    q = fake_quantize(w, "binary", engine.masks["net.2.weight"]).float()
    assert torch.equal(q == 0, ~engine.masks["net.2.weight"])
    rows = [r[r != 0].abs() for r in q]
    assert all(torch.allclose(r, r[:1].expand_as(r)) for r in rows if len(r))


class _Planted:
    """A pickle that runs a command when it is loaded without weights_only."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_deepspeed_checkpoints_load_weights_only(tmp_path, zero_stage):
    engine = _engine("bf16", zero_stage)
    for _ in range(3):
        engine.train_step(*_batch(), 2.0, 0.5)
    engine.prune_to(0.5)
    engine.train_step(*_batch(), 2.0, 0.5)
    engine.save_deepspeed(str(tmp_path / "ds"), tag="t")
    saved = engine.full_fp32_weights()

    fresh = _engine("bf16", zero_stage)  # DeepSpeed's own files, types and all, load weights-only
    fresh.load_deepspeed(str(tmp_path / "ds"), tag="t")
    fresh.set_masks(engine.masks)  # as a resume does, from the checkpoint's masks file
    for name, weight in fresh.full_fp32_weights().items():
        assert torch.equal(weight, saved[name]), name
    torch.manual_seed(5)
    batch = _batch()  # the resumed engine's next step is the original's, bit for bit
    assert fresh.train_step(*batch, 2.0, 0.5) == engine.train_step(*batch, 2.0, 0.5)
    after = engine.full_fp32_weights()
    for name, weight in fresh.full_fp32_weights().items():
        assert torch.equal(weight, after[name]), name
    assert fresh.masked_nonzero() == (0, 0)

    # a tampered optimizer file: refused, and the code it carries never runs
    marker = tmp_path / "ran"
    (optim,) = (tmp_path / "ds" / "t").glob("*optim_states.pt")
    torch.save({"planted": _Planted(marker)}, optim)
    with pytest.raises(Exception, match="Weights only load failed"):
        _engine("bf16", zero_stage).load_deepspeed(str(tmp_path / "ds"), tag="t")
    assert not marker.exists()


class _ResidualCNN(torch.nn.Module):
    """conv-BN-ReLU, a residual block and a linear classifier: (B, 1, 8, 8) -> (B, 10)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.stem(x)
        return self.fc(torch.relu(h + self.block(h)).mean((2, 3)))


def test_channel_masks_hold_on_batchnorm_and_residual_layers_and_shrink_to_the_same_model():
    from trainers.structured import shrink

    # fp32 under ZeRO 1: DeepSpeed still keeps a separate fp32 master copy, partitioned
    spec = _spec("fp32", 1, pruning={"granularity": "channel", "scope": "layer", "rounds": 1,
                                     "target_sparsity": 0.5, "schedule": {"kind": "oneshot"}})
    torch.manual_seed(0)
    engine = DistillEngine(_ResidualCNN(), spec, lr=0.02, micro_batch=16, weight_decay=0.0,
                           grad_clip=1.0, world_size=1, input_shape=(1, 8, 8), num_classes=10)
    assert {"stem.1.weight", "stem.1.bias", "block.4.weight", "fc.weight"} <= set(engine.prunable)
    assert "fc.bias" not in engine.prunable  # the classes are never pruned
    for _ in range(3):
        engine.train_step(*_batch(), 2.0, 0.5)
    engine.prune_to(0.5)
    dead = {n: ~engine.masks[n].flatten(1).any(1) for n in ("stem.0.weight", "block.3.weight")}
    assert int(dead["stem.0.weight"].sum()) == 4  # the residual stream: 4 of 8 channels
    assert torch.equal(dead["stem.0.weight"], dead["block.3.weight"])  # pruned together
    assert torch.equal(~engine.masks["stem.1.weight"], dead["stem.0.weight"])  # and its BatchNorm
    for _ in range(5):
        assert engine.train_step(*_batch(), 2.0, 0.5) is not None
    assert engine.master_fragment(engine.prunable["stem.1.weight"]) is not None  # a 2nd copy
    assert engine.masked_nonzero() == (0, 0)  # module parameters, master fragments
    weights = engine.full_fp32_weights()
    for name, mask in engine.masks.items():
        assert torch.count_nonzero(weights[name][~mask]) == 0, name  # fp32 master copy

    # the trained fp32 weights, channels zeroed, compute what the shrunk model computes
    model = _ResidualCNN()
    buffers = {k: v.float() for k, v in engine.module.state_dict().items() if k not in weights}
    model.load_state_dict({**weights, **buffers})
    model.eval()
    small, shapes = shrink(model, engine.masks, torch.zeros(2, 1, 8, 8))
    assert shapes["stem.0"]["out_channels"] == shapes["block.3"]["out_channels"] == 4
    x = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)
        # fewer terms per sum: fp32 rounding differs at ~1e-7 relative per layer
        torch.testing.assert_close(small(x), expected, rtol=1e-4, atol=1e-5)

    without_shape = DistillEngine(_ResidualCNN(), spec, lr=0.02, micro_batch=16,
                                  weight_decay=0.0, grad_clip=1.0, world_size=1)
    with pytest.raises(RuntimeError, match="input_shape"):
        without_shape.prune_to(0.5)


@pytest.mark.parametrize("precision,zero_stage", [
    ("bf16", 1), ("bf16", 2), ("fp32", 0), ("bf16", 0), ("bf16_autocast", 1),
])
def test_weight_sharing_holds_on_module_and_master_copies(precision, zero_stage):
    """k-means fine-tuning through DeepSpeed's step: after every step both copies of each weight
    (module parameter and fp32 master) hold one value per cluster, pruned weights stay zero."""
    from functools import partial

    from trainers.quantize import (
        enable_fake_quant, layer_kinds, snap_shared_weights_, weight_clusters,
    )

    spec = _spec(precision, zero_stage, quantization={"method": "kmeans", "bits": {"linear": 3}})
    torch.manual_seed(0)
    engine = DistillEngine(MLP(64, [32, 16], 10), spec, lr=0.02, micro_batch=16,
                           weight_decay=0.01, grad_clip=1.0, world_size=1)
    for _ in range(3):  # dense steps first, so Adam has its own moments for every weight
        engine.train_step(*_batch(), 2.0, 0.5)
    engine.prune_to(0.5)
    kinds = layer_kinds(engine.module, "kmeans", spec.quantization.bits)
    clusters = weight_clusters(engine.full_fp32_weights([f"{n}.weight" for n in kinds]), kinds,
                               engine.masks)
    enable_fake_quant(engine.module, kinds, engine.masks, clusters)
    snap = partial(snap_shared_weights_, engine.module, engine.master_fragment,
                   engine.masters_partitioned)
    snap()
    engine.after_step.append(snap)
    start = engine.full_fp32_weights()
    torch.manual_seed(2)
    x, y, t = _batch()
    first = engine.train_step(x, y, t, 2.0, 0.5)
    for _ in range(20):
        last = engine.train_step(x, y, t, 2.0, 0.5)
    assert last["loss"] < 0.9 * first["loss"]
    assert engine.masked_nonzero() == (0, 0)
    masters = engine.full_fp32_weights()
    for name, codes in clusters.items():
        module = engine.prunable[name].detach()
        # bits must match: the module copy is the master's value in the module's dtype
        assert torch.equal(module, masters[name].to(module.dtype))
        for c in range(int(codes.max()) + 1):
            assert len(torch.unique(masters[name][codes == c])) == 1, (name, c)
        shared = torch.unique(masters[name][codes >= 0])
        assert len(shared) <= 2**3
        assert not torch.equal(shared, torch.unique(start[name][codes >= 0]))  # centroids moved


@pytest.mark.parametrize("precision,zero_stage", [("bf16", 1), ("fp32", 2), ("bf16", 3)])
def test_full_fp32_weights_load_into_module_and_master_copies(precision, zero_stage):
    """A weights-only resume: the loaded values are what the next step starts from (the master
    copy too, or the step would write the old weights back)."""
    source = _engine(precision, zero_stage)
    for _ in range(3):
        source.train_step(*_batch(), 2.0, 0.5)
    weights = source.full_fp32_weights()
    target = _engine(precision, zero_stage)
    target.load_fp32_weights(weights)
    for name, weight in target.full_fp32_weights().items():
        assert torch.equal(weight, weights[name]), name
    x = _batch()[0]
    # the module copy: the same logits (bitwise: same weights, same kernels, same input)
    assert torch.equal(target.predict(x), source.predict(x))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_one_rank_zero_3_masks_equal_the_unsharded_computation(precision):
    """Under ZeRO 3 the threshold comes from the shards (here one rank's, whole); the masks are
    the unsharded pruner's on the same fp32 weights, round after round."""
    from trainers.pruning import GlobalMagnitudePruner

    engine = _engine(precision, 3)
    previous = None
    for sparsity in (0.3, 0.7, 0.9):
        for _ in range(2):
            engine.train_step(*_batch(), 2.0, 0.5)
        weights = engine.full_fp32_weights(list(engine.prunable))
        expected, threshold = GlobalMagnitudePruner.compute_masks(weights, sparsity, previous)
        # exact: the threshold is one weight's magnitude, the same float32 on both sides
        assert engine.prune_to(sparsity) == threshold
        for name, mask in expected.items():
            assert torch.equal(engine.masks[name], mask), name
        previous = expected


def test_fp16_overflow_steps_are_skipped_and_counted():
    """DeepSpeed's dynamic loss scale starts at 2^16: inputs of 300 make the scaled gradients
    overflow fp16 (max 65504) while the loss stays finite, so those steps are skipped, the
    weights unchanged, until the scale has come down far enough."""
    engine = _engine("fp16", 1)
    x, y, t = _batch()
    engine.prune_to(0.5)
    weights = engine.full_fp32_weights()
    assert engine.train_step(x * 300, y, t, 2.0, 0.5) is not None  # a finite loss: not skipped
    assert engine.overflow_steps == 1
    for name, weight in engine.full_fp32_weights().items():
        assert torch.equal(weight, weights[name]), name
    steps = 1
    while engine.overflow_steps == steps and steps < 30:
        engine.train_step(x * 300, y, t, 2.0, 0.5)
        steps += 1
    assert 1 < engine.overflow_steps < steps < 30  # the scale came down and steps apply again
    assert engine.nonfinite_steps == 0
    assert engine.masked_nonzero() == (0, 0)
    assert not torch.equal(engine.full_fp32_weights()["net.0.weight"], weights["net.0.weight"])
