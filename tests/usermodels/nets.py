"""A user's model factory, called as `make_student(num_classes=..., in_channels=..., **kwargs)`."""

from torch import nn


def make_student(num_classes: int, in_channels: int, width: int = 16) -> nn.Module:
    """A small CNN: conv-BN-ReLU twice, pooled to 4x4, a linear classifier."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, num_classes),
    )


def not_a_model(num_classes: int, in_channels: int):
    return {"num_classes": num_classes}
