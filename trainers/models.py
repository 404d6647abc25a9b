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

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, padding: int = 0):
        super().__init__()
        channels, height, width = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, 20, 5, padding=padding),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5, padding=padding),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():  # flattened size depends on the image size and padding
            flat = self.features(torch.zeros(1, channels, height, width)).numel()
        self.classifier = nn.Sequential(
            nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, num_classes)
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


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
