"""The model registry: specs name models by kind, and the data gives their input and output sizes.

Kinds:
* `mlp`, `lenet5`: stillhouse's own small models (below);
* `timm`: `timm.create_model(name, pretrained=False, num_classes=..., in_chans=..., **kwargs)`;
* `torchvision`: `torchvision.models.get_model(name, weights=None, num_classes=..., **kwargs)`,
  its first convolution rebuilt for the data's channels when they are not 3;
* `python`: a user's factory `package.module:function(num_classes=..., in_channels=..., **kwargs)`,
  imported only when its top-level package is trusted by the operator (`--trust-module`), never
  because a spec says so.

Nothing is downloaded: registry models start from random weights, and a teacher's weights come
from the file the spec names. `architecture` describes a built model as JSON, from which
`build_from_architecture` rebuilds it (export files carry it: loading needs neither the spec nor
pickled objects).
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import nn

from specs.errors import InputError
from specs.job import LeNet5Model, MLPModel, PythonModel, TimmModel, TorchvisionModel

TRUSTED_ENV = "STILLHOUSE_TRUSTED_MODULES"  # comma-separated top-level packages


class ModelError(InputError):
    """A model the spec names cannot be built for this data (unknown name, bad kwargs, untrusted
    code, wrong output shape)."""


class MLP(nn.Module):
    """ReLU MLP on flattened images: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, in_features: int, hidden: list[int], num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class LeNet5(nn.Module):
    """Caffe's LeNet-5 (431k parameters on 28x28 MNIST): conv20-pool-conv50-pool-fc500-fc10."""

    WIDTHS = (20, 50, 500)  # conv1 filters, conv2 filters, hidden units

    def __init__(
        self, image_shape: tuple[int, int, int], num_classes: int, padding: int = 0,
        widths: tuple[int, int, int] = WIDTHS,
    ):
        super().__init__()
        channels, height, width = image_shape
        c1, c2, hidden = widths  # fewer after structured pruning removes channels
        self.features = nn.Sequential(
            nn.Conv2d(channels, c1, 5, padding=padding),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=padding),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():  # flattened size depends on the image size and padding
            flat = self.features(torch.zeros(1, channels, height, width)).numel()
        self.classifier = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# ------------------------------------------------------------------------------------ trust


def trusted_modules(cli: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """Top-level packages whose code `python` models may run: the command line's
    `--trust-module` values and `STILLHOUSE_TRUSTED_MODULES` (comma-separated)."""
    env = [m.strip() for m in os.environ.get(TRUSTED_ENV, "").split(",") if m.strip()]
    return frozenset([*cli, *env])


def check_trusted(spec: PythonModel, trusted: frozenset[str], where: str) -> None:
    if spec.package not in trusted:
        raise ModelError(
            f"`{where}.factory` {spec.factory!r} would import and run code from the package "
            f"{spec.package!r}, which is not trusted: pass `--trust-module {spec.package}` (or set "
            f"{TRUSTED_ENV}={spec.package}) if you trust it; a spec alone never runs code"
        )


def trusted_package_dirs(packages: frozenset[str]) -> list[str]:
    """Where each trusted package lives, for shipping to Ray workers (`py_modules`)."""
    import importlib.util

    dirs = []
    for name in sorted(packages):
        found = importlib.util.find_spec(name)
        if found is None:
            raise ModelError(f"trusted module {name!r} cannot be imported here (not on sys.path)")
        if found.submodule_search_locations:  # a package: its folder
            dirs.append(str(list(found.submodule_search_locations)[0]))
        elif found.origin:  # a single-file module
            dirs.append(found.origin)
    return dirs


# ---------------------------------------------------------------------------------- building


def _first_conv_for(model: nn.Module, channels: int) -> None:
    """Rebuild the first Conv2d for `channels` inputs (torchvision models are made for RGB)."""
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == channels:
                    return
                conv = nn.Conv2d(
                    channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else channels,
                    child.bias is not None, child.padding_mode,
                )
                setattr(parent, name, conv)
                return


def _build(spec, image_shape: tuple[int, int, int], num_classes: int, trusted: frozenset[str],
           where: str) -> nn.Module:
    channels, height, width = image_shape
    if isinstance(spec, MLPModel):
        return MLP(channels * height * width, list(spec.hidden), num_classes)
    if isinstance(spec, LeNet5Model):
        return LeNet5(image_shape, num_classes, padding=spec.padding, widths=tuple(spec.widths))
    if isinstance(spec, TimmModel):
        import timm

        if not timm.is_model(spec.name):
            close = timm.list_models(f"*{spec.name[:4]}*")[:8]
            raise ModelError(f"`{where}.name` {spec.name!r} is not a timm model"
                             + (f" (similar: {', '.join(close)})" if close else ""))
        return timm.create_model(spec.name, pretrained=False, num_classes=num_classes,
                                 in_chans=channels, **spec.kwargs)
    if isinstance(spec, TorchvisionModel):
        import torchvision

        names = torchvision.models.list_models(module=torchvision.models)  # classification only
        if spec.name not in names:
            close = [n for n in names if n.startswith(spec.name[:4])][:8]
            raise ModelError(f"`{where}.name` {spec.name!r} is not a torchvision classification "
                             "model" + (f" (similar: {', '.join(close)})" if close else ""))
        model = torchvision.models.get_model(spec.name, weights=None, num_classes=num_classes,
                                             **spec.kwargs)
        _first_conv_for(model, channels)
        return model
    if isinstance(spec, PythonModel):
        check_trusted(spec, trusted, where)
        module_name, function = spec.factory.split(":")
        try:
            factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as err:
            raise ModelError(f"`{where}.factory` {spec.factory!r}: {err}") from None
        model = factory(num_classes=num_classes, in_channels=channels, **spec.kwargs)
        if not isinstance(model, nn.Module):
            raise ModelError(f"`{where}.factory` {spec.factory!r} returned a "
                             f"{type(model).__name__}, not a torch.nn.Module")
        return model
    raise TypeError(f"no model registered for {type(spec).__name__}")


def build_model(
    spec, image_shape: tuple[int, int, int], num_classes: int,
    trusted: frozenset[str] = frozenset(), where: str = "model",
) -> nn.Module:
    """The model `spec` names, sized for (C, H, W) inputs and `num_classes` outputs. A bad name,
    bad keyword arguments or untrusted code is a `ModelError` naming the YAML path `where`."""
    try:
        return _build(spec, tuple(image_shape), num_classes, trusted, where)
    except ModelError:
        raise
    except (TypeError, ValueError, RuntimeError, AssertionError) as err:  # the builder's own check
        raise ModelError(f"`{where}` ({spec.kind}) cannot be built with these settings: "
                         f"{type(err).__name__}: {err}") from None


def check_model(model: nn.Module, image_shape: tuple[int, int, int], num_classes: int,
                where: str) -> None:
    """A forward pass on two blank images must give (2, num_classes) logits."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, *image_shape))
    except Exception as err:  # the model's own error, e.g. an image too small for its strides
        raise ModelError(f"`{where}` does not run on images of shape {tuple(image_shape)}: "
                         f"{type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelError(f"`{where}` gives {shape} for 2 images, not (2, {num_classes}) logits")


def architecture(spec, image_shape: tuple[int, int, int], num_classes: int) -> dict:
    """A JSON description that `build_from_architecture` rebuilds the model from (export files
    carry it, so loading needs neither the spec nor pickled objects)."""
    base = {"kind": spec.kind, "image_shape": list(image_shape), "num_classes": num_classes}
    if isinstance(spec, MLPModel):
        return {**base, "hidden": list(spec.hidden)}
    if isinstance(spec, LeNet5Model):
        return {**base, "padding": spec.padding, "widths": list(spec.widths)}
    if isinstance(spec, (TimmModel, TorchvisionModel)):
        return {**base, "name": spec.name, "kwargs": dict(spec.kwargs)}
    if isinstance(spec, PythonModel):
        return {**base, "factory": spec.factory, "kwargs": dict(spec.kwargs)}
    raise TypeError(f"no model registered for {type(spec).__name__}")


def build_from_architecture(arch: dict, trusted: frozenset[str] = frozenset()) -> nn.Module:
    """The model an `architecture` dict describes, with random weights (load a state dict next).

    Structured pruning records the shrunk layers' sizes under `module_shapes`; the full model is
    built from its registry and those layers are resized to them."""
    c, h, w = (int(v) for v in arch["image_shape"])
    num_classes = int(arch["num_classes"])
    kind = arch["kind"]
    if kind == "mlp":
        model = MLP(c * h * w, [int(v) for v in arch["hidden"]], num_classes)
    elif kind == "lenet5":
        widths = tuple(int(v) for v in arch["widths"])
        model = LeNet5((c, h, w), num_classes, int(arch["padding"]), widths)
    elif kind in ("timm", "torchvision"):
        spec_cls = TimmModel if kind == "timm" else TorchvisionModel
        spec = spec_cls(kind=kind, name=arch["name"], kwargs=arch.get("kwargs", {}))
        model = build_model(spec, (c, h, w), num_classes, trusted, where="architecture")
    elif kind == "python":
        spec = PythonModel(kind="python", factory=arch["factory"], kwargs=arch.get("kwargs", {}))
        model = build_model(spec, (c, h, w), num_classes, trusted, where="architecture")
    else:
        raise ValueError(f"unknown architecture kind {kind!r}")
    if arch.get("module_shapes"):
        from trainers.structured import reshape_modules

        reshape_modules(model, arch["module_shapes"])
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
