"""CIFAR-style ResNet-18 (He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", CVPR 2016):
the variant common in CIFAR-10 robustness code, and the one pyautoattack's example checkpoint uses.

Differences from the ImageNet ResNet-18 (torchvision): a 3x3 stride-1 stem without max-pooling,
so 32x32 inputs keep their resolution in the first stage (32 -> 32 -> 16 -> 8 -> 4), then global
average pooling and a linear layer. Post-activation basic blocks; a block whose stride or width
changes projects its shortcut with a 1x1 convolution and BatchNorm.

Parameter names follow the convention of that code (``conv1``, ``bn1``, ``layerK.i.conv1`` /
``bn1`` / ``conv2`` / ``bn2`` / ``shortcut.0`` (conv) / ``shortcut.1`` (BN), ``linear``), so a
bare state dict saved from it - e.g. ``pyautoattack/examples/model_test.pt``, 10 classes, inputs
in [0, 1] without normalization - loads with ``strict=True``. Without ``mean`` / ``std`` the
model applies no normalization (as that checkpoint expects); with them, a :class:`Normalize`
layer (non-persistent statistics, so state dicts keep the same keys) standardizes first.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..registry import MODELS
from .normalization import Normalize

#: Blocks per stage.
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; ``shortcut`` is a module (``nn.Identity``
    when nothing is projected), so a forward hook on it sees the skip branch."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _Stats(Normalize):
    """:class:`Normalize` whose statistics are not saved in the state dict."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        mean_t, std_t = self.mean, self.std
        del self.mean, self.std
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)


class ResNetCIFAR(nn.Module):
    """CIFAR-style ResNet (depth 18 or 34) taking [0, 1] images; see the module docstring."""

    def __init__(self, depth: int = 18, in_channels: int = 3, num_classes: int = 10, width: int = 64,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if depth not in DEPTHS:
            raise InputError(f"depth must be one of {sorted(DEPTHS)}, got {depth!r}")
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key} must be a positive integer, got {value!r}")
        if (mean is None) != (std is None):
            raise InputError("give both mean and std (or neither: no normalization)")
        self.config = {"depth": depth, "in_channels": in_channels, "num_classes": num_classes, "width": width,
                       "mean": None if mean is None else [float(v) for v in mean],
                       "std": None if std is None else [float(v) for v in std]}
        if mean is not None and std is not None:
            if len(mean) != in_channels or len(std) != in_channels:
                raise InputError(f"mean/std need {in_channels} values (one per input channel), got {len(mean)} and {len(std)}")
            self.normalize: nn.Module = _Stats(mean, std)
        else:
            self.normalize = nn.Identity()
        self.in_channels = in_channels
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for k, (blocks, mult) in enumerate(zip(DEPTHS[depth], (1, 2, 4, 8)), start=1):
            cout = width * mult
            layers = []
            for i in range(blocks):
                layers.append(BasicBlock(cin, cout, stride=2 if (k > 1 and i == 0) else 1))
                cin = cout
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        self.linear = nn.Linear(cin, num_classes)

    def get_classifier(self) -> nn.Linear:
        """The last layer, ``linear``."""
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (N x 8*width): global average pool of the last stage."""
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.in_channels:
            raise InputError(f"model expects {self.in_channels}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})")
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))


@MODELS.register("resnet18_cifar")
def resnet18_cifar(in_channels: int = 3, num_classes: int = 10, width: int = 64,
                   mean: list | None = None, std: list | None = None) -> ResNetCIFAR:
    """CIFAR-style ResNet-18 (11.2 M parameters at width 64); loads pyautoattack's ``model_test.pt``.

    No normalization by default (the checkpoint takes raw [0, 1] images); pass ``mean`` / ``std``
    for weights trained on standardized inputs.
    """
    model = ResNetCIFAR(18, in_channels, num_classes, width, mean, std)
    model.registry_name = "resnet18_cifar"  # type: ignore[assignment]
    model.config = {k: v for k, v in model.config.items() if k != "depth"}  # the factory's own arguments
    return model
