"""A small, fast CNN for CPU experiments (digits, MNIST-like and CIFAR-sized inputs).

A VGG-style network (Simonyan & Zisserman, ICLR 2015) with batch normalization (Ioffe &
Szegedy, ICML 2015) and global average pooling (Lin et al., "Network in Network", ICLR 2014):
two stages of two 3x3 conv-BN-ReLU layers with max-pooling after each, then a linear layer.
At ``width=32`` it reaches about 95 % test accuracy on scikit-learn digits at 32x32 in a few
CPU epochs of about 2 s each on one core.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError
from ..registry import MODELS
from .normalization import Normalize, default_stats


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


@MODELS.register("small_cnn")
class SmallCNN(nn.Module):
    """Normalize -> [conv-BN-ReLU x2, max-pool] (``width``) -> [conv-BN-ReLU x2, max-pool]
    (``2 * width``) -> global average pool -> ``classifier`` (linear).

    ``features(x)`` returns the pooled ``2 * width`` penultimate features (activation
    clustering and spectral-signature filters read these). Any input size >= 4x4 works.

    The conv weights are stored channels-last, so convolutions and pooling run on NHWC
    activations (oneDNN's native layout on CPU: no reorder per call). On the demo's model (width
    16, 32x32 digits, 2-vCPU EPYC) that made an attack pass (forward + input gradient, batches
    of 256) ~2x faster and a training step ~1.6x; the function computed is the same.
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
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
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
        self.body.to(memory_format=torch.channels_last)

    def get_classifier(self) -> nn.Linear:
        """The last layer, ``classifier`` (timm-style accessor shared by robustkit models)."""
        return self.classifier

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N x 2*width), the input of ``classifier``."""
        return self.pool(self.body(self.normalize(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
