"""PreActResNet18: He, Zhang, Ren, Sun, "Identity Mappings in Deep Residual Networks", ECCV 2016.

The CIFAR-10 variant used by BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks)
and FT-SAM (Zhu et al., "Enhancing Fine-Tuning Based Backdoor Defense with Sharpness-Aware
Minimization", ICCV 2023): 3x3 stem conv, four stages of two :class:`PreActBlock`, adaptive
average pooling and ``linear``. As in BackdoorBench there is no final BN-ReLU before the
pooling, so parameter names match theirs (``conv1``, ``layerK.i.bn1`` ..., ``shortcut.0``,
``linear``); only our ``normalize.mean/std`` buffers are extra, so a BackdoorBench state
dict loads with ``model.load_state_dict(sd, strict=False)``.

Every block calls ``self.shortcut`` as a module - ``nn.Identity`` when no projection is
needed - so a forward hook on ``layerK[i].shortcut`` sees (and may replace) the skip branch,
e.g. to scale it as in skip-connection suppression (Yang et al., "Backdoor Defense via
Suppressing Model Shortcuts", ICASSP 2023).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..registry import MODELS
from .normalization import Normalize, default_stats

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    """Pre-activation basic block.

    ``pre = relu(bn1(x))``; ``out = residual(pre) + shortcut(pre if projecting else x)`` with
    ``residual(pre) = conv2(relu(bn2(conv1(pre))))``. ``shortcut`` is a 1x1 convolution (in
    an ``nn.Sequential``, as in BackdoorBench) when the stride or the width changes, else
    ``nn.Identity``; it is always called as a module so its forward hooks fire.
    """

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
        """The residual branch applied to the pre-activated input ``relu(bn1(x))``."""
        return self.conv2(F.relu(self.bn2(self.conv1(pre))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        skip = self.shortcut(pre if self.projects else x)
        out = self.residual(pre) + skip
        return out


@MODELS.register("preact_resnet18")
class PreActResNet18(nn.Module):
    """PreActResNet18 for 32x32 inputs (other sizes work too: the pooling is adaptive).

    Normalization is the first layer: CIFAR-10 statistics by default on 3 channels, 0.5 / 0.5
    otherwise. ``features(x)`` returns the pooled ``8 * width``-d (512-d) penultimate features
    (the input of ``linear``, also returned by ``get_classifier()``). ``width`` (default 64,
    the paper's) scales every stage; ``width=16`` is a 16x cheaper variant for CPU runs.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        width: int = 64,
    ):
        super().__init__()
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        if mean is None and std is None and in_channels == 3:
            mean, std = CIFAR10_MEAN, CIFAR10_STD
        mean, std = default_stats(in_channels, mean, std)
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "mean": mean, "std": std}
        if width != 64:
            self.config["width"] = width
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.in_planes = width
        self.layer1 = self._make_layer(width, 2, 1)
        self.layer2 = self._make_layer(2 * width, 2, 2)
        self.layer3 = self._make_layer(4 * width, 2, 2)
        self.layer4 = self._make_layer(8 * width, 2, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def get_classifier(self) -> nn.Linear:
        """The last layer, ``linear`` (timm-style accessor shared by robustkit models)."""
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N x 8*width): pooled output of ``layer4``."""
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.avgpool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))
