"""Per-channel normalization as the first layer of a model (inputs stay in [0, 1] outside)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import InputError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with a clear error on a channel mismatch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise InputError(f"mean has {len(mean)} values but std has {len(std)}")
        if any(s <= 0 for s in std):
            raise InputError(f"std must be > 0, got {list(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise InputError(f"model input must be N x C x H x W, got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            raise InputError(f"model expects {self.channels}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


def default_stats(in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[list[float], list[float]]:
    """The given statistics, or 0.5 / 0.5 per channel; checks the channel count."""
    mean = list(mean) if mean is not None else [0.5] * in_channels
    std = list(std) if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise InputError(f"mean/std need {in_channels} values (one per input channel), got {len(mean)} and {len(std)}")
    return mean, std
