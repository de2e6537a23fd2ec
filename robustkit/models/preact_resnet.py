"""PreActResNet18 (He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016),
the CIFAR-10 version used by BackdoorBench and FT-SAM.

Every block calls ``self.shortcut`` as a module (``nn.Identity`` when no projection is needed) so
a forward hook on ``layerK[i].shortcut`` can scale the skip branch (skip-connection suppression).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import MODELS
from .normalization import Normalize, default_stats

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    """out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut(x or relu(bn1(x)))."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_planes != planes
        self.shortcut: nn.Module = (
            nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)) if self.projects else nn.Identity()
        )

    def residual(self, pre: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.bn2(self.conv1(pre))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre if self.projects else x)
        return self.residual(pre) + skip


@MODELS.register("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreActResNet18 for 32x32 inputs (any size works: global average pooling at the end)."""

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__()
        if mean is None and std is None and in_channels == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        mean, std = default_stats(in_channels, mean, std)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "mean": mean, "std": std}
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.in_planes = 64
        self.layer1 = self._make_layer(64, 2, 1)
        self.layer2 = self._make_layer(128, 2, 2)
        self.layer3 = self._make_layer(256, 2, 2)
        self.layer4 = self._make_layer(512, 2, 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))
