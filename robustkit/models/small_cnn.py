"""A small, fast CNN for CPU experiments."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..registry import MODELS
from .normalization import Normalize, default_stats


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Four 3x3 conv-BN-ReLU layers in two stages (width, 2*width), max-pooling after each,
    global average pooling and a linear classifier. Normalization is the first layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        mean, std = default_stats(in_channels, mean, std)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "width": width, "mean": mean, "std": std}
        self.normalize = Normalize(mean, std)
        w = width
        self.body = nn.Sequential(
            _conv_bn(in_channels, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N x 2*width), the input of ``classifier``."""
        return self.pool(self.body(self.normalize(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
