"""Per-channel normalization as the first layer of a model.

Images stay in [0, 1] everywhere outside the model; attacks, preprocessors and eps-balls
all live in that space. The model standardizes internally, as RobustBench models do
(Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS 2021
Datasets and Benchmarks).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..errors import InputError


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean`` and ``std`` are (saved) buffers.

    Raises :class:`~robustkit.errors.InputError` when the input is not ``N x C x H x W`` or
    its channel count differs from the statistics'.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) != len(std) or not mean:
            raise InputError(f"mean and std need one value per channel, got {len(mean)} and {len(std)} values")
        if not all(math.isfinite(v) for v in mean + std):
            raise InputError(f"mean and std must be finite, got mean={mean} std={std}")
        if any(s <= 0 for s in std):
            raise InputError(f"std must be > 0, got {std}")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"model input must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            hint = " (a single image? add a batch dimension with x.unsqueeze(0))" if x.dim() == 3 else ""
            raise InputError(f"model input must be N x C x H x W, got {x.dim()} dims {tuple(x.shape)}{hint}")
        if x.shape[1] != self.channels:
            raise InputError(
                f"model expects {self.channels}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})"
            )
        if not x.is_floating_point():
            raise InputError(f"model input must be a float tensor in [0, 1], got dtype {x.dtype} (use x.float() / 255)")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        return f"mean={[round(v, 4) for v in self.mean.flatten().tolist()]}, std={[round(v, 4) for v in self.std.flatten().tolist()]}"


def default_stats(
    in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """The given statistics (as lists), or 0.5 / 0.5 per channel; checks there is one per channel."""
    mean = [float(v) for v in mean] if mean is not None else [0.5] * in_channels
    std = [float(v) for v in std] if std is not None else [0.5] * in_channels
    if len(mean) != in_channels or len(std) != in_channels:
        raise InputError(
            f"mean/std need {in_channels} values (one per input channel), got {len(mean)} and {len(std)}"
        )
    return mean, std
