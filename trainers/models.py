"""The model registry. Specs name models by kind; nothing is imported from a dotted path."""

from __future__ import annotations

import torch
from torch import nn

from specs.job import LeNet5Model, MLPModel


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


def build_model(
    spec: MLPModel | LeNet5Model, image_shape: tuple[int, int, int], num_classes: int
) -> nn.Module:
    if isinstance(spec, MLPModel):
        c, h, w = image_shape
        return MLP(c * h * w, list(spec.hidden), num_classes)
    if isinstance(spec, LeNet5Model):
        return LeNet5(image_shape, num_classes, padding=spec.padding)
    raise TypeError(f"no model registered for {type(spec).__name__}")


def architecture(
    spec: MLPModel | LeNet5Model, image_shape: tuple[int, int, int], num_classes: int
) -> dict:
    """A JSON description that `build_from_architecture` rebuilds the model from (export files
    carry it, so loading needs neither the spec nor pickled objects)."""
    if isinstance(spec, MLPModel):
        return {"kind": "mlp", "image_shape": list(image_shape), "hidden": list(spec.hidden),
                "num_classes": num_classes}
    if isinstance(spec, LeNet5Model):
        return {"kind": "lenet5", "image_shape": list(image_shape), "padding": spec.padding,
                "widths": list(LeNet5.WIDTHS), "num_classes": num_classes}
    raise TypeError(f"no model registered for {type(spec).__name__}")


def build_from_architecture(arch: dict) -> nn.Module:
    """The model `arch` describes; with `module_shapes` (structured pruning removed channels),
    the full-size model is built and those modules are resized to the recorded shapes."""
    c, h, w = (int(v) for v in arch["image_shape"])
    if arch["kind"] == "mlp":
        model = MLP(c * h * w, [int(v) for v in arch["hidden"]], int(arch["num_classes"]))
    elif arch["kind"] == "lenet5":
        widths = tuple(int(v) for v in arch["widths"])
        model = LeNet5((c, h, w), int(arch["num_classes"]), int(arch["padding"]), widths)
    else:
        raise ValueError(f"unknown architecture kind {arch['kind']!r}")
    if "module_shapes" in arch:
        from trainers.structured import reshape_modules

        reshape_modules(model, arch["module_shapes"])
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
