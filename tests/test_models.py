"""The model registry without Ray: timm and torchvision by name, a user's factory only when its
package is trusted, sizes from the data, and the JSON architecture that rebuilds each."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from specs import SpecError, parse_spec
from specs.job import PythonModel, TimmModel, TorchvisionModel
from trainers.models import (
    ModelError, architecture, build_from_architecture, build_model, check_model, trusted_modules,
)

sys.path.insert(0, str(Path(__file__).parent))  # tests/usermodels, a user's own package

USER = PythonModel(kind="python", factory="usermodels.nets:make_student", kwargs={"width": 8})


@pytest.mark.parametrize("spec,shape", [
    (TimmModel(kind="timm", name="resnet10t", kwargs={"drop_rate": 0.1}), (1, 16, 16)),
    (TorchvisionModel(kind="torchvision", name="mobilenet_v3_small"), (1, 32, 32)),
    (TorchvisionModel(kind="torchvision", name="resnet18"), (3, 16, 16)),
    (USER, (3, 8, 8)),
])
def test_registry_models_take_their_sizes_from_the_data_and_rebuild_from_json(spec, shape):
    trusted = frozenset({"usermodels"})
    torch.manual_seed(0)
    model = build_model(spec, shape, 7, trusted)
    check_model(model, shape, 7, "student.model")  # (2, 7) logits from (2, *shape) images
    arch = architecture(spec, shape, 7)
    rebuilt = build_from_architecture(arch, trusted)
    rebuilt.load_state_dict(model.state_dict())  # the same layers and shapes
    x = torch.randn(3, *shape)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))  # same weights, same ops: bit for bit


def test_a_spec_alone_never_runs_code(monkeypatch):
    monkeypatch.delenv("STILLHOUSE_TRUSTED_MODULES", raising=False)
    with pytest.raises(ModelError, match="--trust-module usermodels"):
        build_model(USER, (1, 8, 8), 10, trusted_modules(), where="student.model")
    monkeypatch.setenv("STILLHOUSE_TRUSTED_MODULES", "other, usermodels")
    assert "usermodels" in trusted_modules()
    bad = PythonModel(kind="python", factory="usermodels.nets:not_a_model")
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        build_model(bad, (1, 8, 8), 10, frozenset({"usermodels"}))
    missing = PythonModel(kind="python", factory="usermodels.nets:nothing_here")
    with pytest.raises(ModelError, match="nothing_here"):
        build_model(missing, (1, 8, 8), 10, frozenset({"usermodels"}))


def test_unknown_names_and_bad_kwargs_are_clear_errors():
    with pytest.raises(ModelError, match="`student.model.name` 'resnet1800' is not a timm model"):
        build_model(TimmModel(kind="timm", name="resnet1800"), (3, 32, 32), 10,
                    where="student.model")
    with pytest.raises(ModelError, match="not a torchvision classification model"):
        build_model(TorchvisionModel(kind="torchvision", name="fasterrcnn_resnet50_fpn"),
                    (3, 32, 32), 10)
    with pytest.raises(ModelError, match="cannot be built"):
        build_model(TimmModel(kind="timm", name="resnet10t", kwargs={"no_such_arg": 1}),
                    (3, 32, 32), 10)
    small = build_model(TorchvisionModel(kind="torchvision", name="inception_v3",
                                         kwargs={"aux_logits": False, "init_weights": False}),
                        (3, 32, 32), 10)
    with pytest.raises(ModelError, match=r"does not run on images of shape \(3, 32, 32\)"):
        check_model(small, (3, 32, 32), 10, "student.model")


def test_sizes_come_from_the_data_never_from_the_user_twice():
    base = {"name": "t", "data": {"kind": "digits"},
            "teacher": {"kind": "train", "model": {"kind": "mlp", "hidden": [8]}}}
    for kind, key in (("timm", "num_classes"), ("timm", "in_chans"), ("torchvision", "weights"),
                      ("python", "in_channels")):
        model = {"kind": kind, "kwargs": {key: 3}}
        model.update({"factory": "a.b:c"} if kind == "python" else {"name": "resnet18"})
        with pytest.raises(SpecError) as info:
            parse_spec({**base, "student": {"model": model}})
        (problem,) = info.value.problems
        assert problem.path == "student.model" and key in problem.message


def test_every_example_names_only_existing_model_kinds():
    """Each example's models build on its data's image shape (the examples' data comes from
    scripts/digits_files.py; here only the model side is checked, on the shape the spec asks).
    A language-model example's models are built from their configs and run on a block."""
    from specs import load_spec
    from trainers.models import build_model, check_model

    for path in sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml")):
        spec = load_spec(path)
        if spec.language_model:
            import torch

            from trainers.hf_models import build_hf_model

            for where, model_spec in spec.model_specs():
                model = build_hf_model(model_spec)
                vocab = model.config.vocab_size
                ids = torch.randint(0, vocab, (2, spec.data.seq_len))
                with torch.no_grad():
                    logits = model(input_ids=ids).logits
                assert logits.shape == (2, spec.data.seq_len, vocab), (path.name, where)
            continue
        size = spec.data.image_size or ((28, 28) if spec.data.kind == "mnist" else (8, 8))
        shape = (spec.data.channels or 1, *size)
        for where, model_spec in spec.model_specs():
            model = build_model(model_spec, shape, 10, frozenset({"usermodels"}), where)
            check_model(model, shape, 10, f"{path.name}: {where}")
